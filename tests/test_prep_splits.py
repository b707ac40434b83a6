"""prep_splits.py: deterministic, disjoint LJSpeech splits through the CLI, its errors and --download."""

from __future__ import annotations

import csv
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from prep_splits import resolve_test_size
from utils import UserError, read_manifest

REPO = Path(__file__).resolve().parents[1]
LJSPEECH_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "ljspeech_sample"
NUM_CLIPS = 20


def make_fake_ljspeech(folder: Path, num_clips: int = NUM_CLIPS) -> Path:
    """An LJSpeech-shaped folder: metadata.csv (raw and normalized columns differ) and short sine wavs."""
    (folder / "wavs").mkdir(parents=True)
    lines = []
    for i in range(num_clips):
        clip_id = f"LJ001-{i + 1:04d}"
        t = np.arange(2205) / 22050
        sf.write(folder / "wavs" / f"{clip_id}.wav", 0.3 * np.sin(2 * np.pi * (200 + 10 * i) * t), 22050,
                 subtype="PCM_16")
        # The raw column has digits and the normalized one words: the manifest must carry the latter.
        lines.append(f"{clip_id}|Clip {i}, said \"raw\".|Clip number {i}, said \"normalized\".")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def fake_ljspeech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_ljspeech(tmp_path_factory.mktemp("lj") / "LJSpeech-1.1")


def run_prep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "prep_splits.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, check=False)


def read_split(folder: Path) -> tuple[list[str], list[str], list[dict[str, str]]]:
    with open(folder / "train.csv", newline="", encoding="utf-8") as handle:
        train_rows = list(csv.DictReader(handle))
    test = [row.audio_path for row in read_manifest(folder / "test.csv")]
    return [row["file_path"] for row in train_rows], test, train_rows


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_split_is_deterministic_disjoint_and_complete(fake_ljspeech: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    done = run_prep("--path_to_ljspeech", fake_ljspeech, "--path_to_save", first, "--test_size", 5, "--seed", 3)
    assert done.returncode == 0, done.stderr
    assert "15 train clips" in done.stdout and "5 test clips" in done.stdout and str(first / "train.csv") in done.stdout
    assert run_prep("--path_to_ljspeech", fake_ljspeech, "--path_to_save", second, "--test_size", 5,
                    "--seed", 3).returncode == 0
    for name in ("train.csv", "test.csv"):
        assert (first / name).read_bytes() == (second / name).read_bytes()

    train, test, train_rows = read_split(first)
    assert (len(train), len(test)) == (15, 5)
    assert not set(train) & set(test)
    every_clip = {str(p) for p in (fake_ljspeech / "wavs").glob("*.wav")}
    assert set(train) | set(test) == every_clip
    assert all(Path(path).is_absolute() for path in train)
    for row in train_rows:
        number = int(Path(row["file_path"]).stem.split("-")[1]) - 1
        assert row["normalized_transcript"] == f'Clip number {number}, said "normalized".'


def test_another_seed_gives_another_split(fake_ljspeech: Path, tmp_path: Path) -> None:
    tests = []
    for seed in (0, 1):
        assert run_prep("--path_to_ljspeech", fake_ljspeech, "--path_to_save", tmp_path / str(seed),
                        "--test_size", 5, "--seed", seed).returncode == 0
        tests.append(set(read_split(tmp_path / str(seed))[1]))
    assert tests[0] != tests[1]


def test_default_test_size_is_capped_for_a_small_corpus(fake_ljspeech: Path, tmp_path: Path) -> None:
    assert run_prep("--path_to_ljspeech", fake_ljspeech, "--path_to_save", tmp_path).returncode == 0
    train, test, _ = read_split(tmp_path)
    assert (len(train), len(test)) == (18, 2)
    # On a full-size corpus the default stays LJSpeech's usual 150.
    assert resolve_test_size(None, 13100) == 150
    with pytest.raises(UserError):
        resolve_test_size(None, 1)


def test_too_large_test_size_is_a_one_line_error(fake_ljspeech: Path, tmp_path: Path) -> None:
    done = run_prep("--path_to_ljspeech", fake_ljspeech, "--path_to_save", tmp_path, "--test_size", NUM_CLIPS)
    assert_one_line_error(done, "--test_size", str(NUM_CLIPS))
    assert not (tmp_path / "train.csv").exists()


def test_missing_metadata_and_missing_wav_are_one_line_errors(tmp_path: Path) -> None:
    assert_one_line_error(run_prep("--path_to_ljspeech", tmp_path / "nowhere", "--path_to_save", tmp_path / "out"),
                          "metadata.csv", "--download")
    corpus = make_fake_ljspeech(tmp_path / "LJSpeech-1.1", num_clips=4)
    (corpus / "wavs" / "LJ001-0003.wav").unlink()
    assert_one_line_error(run_prep("--path_to_ljspeech", corpus, "--path_to_save", tmp_path / "out"),
                          "LJ001-0003.wav", "line 3")


def test_download_without_network_says_to_fetch_by_hand(tmp_path: Path) -> None:
    target = tmp_path / "data" / "LJSpeech-1.1"
    # Port 9 (discard) on localhost refuses the connection at once: the same path as no network.
    done = run_prep("--path_to_ljspeech", target, "--path_to_save", tmp_path / "out", "--download",
                    "--url", "http://127.0.0.1:9/LJSpeech-1.1.tar.bz2")
    assert_one_line_error(done, "cannot download", "by hand", str(target.parent), "LJSpeech-1.1.tar.bz2")
    assert not list((tmp_path / "data").glob("*.partial")), "a failed download must not leave a partial file"


def test_download_fetches_and_unpacks_an_archive(tmp_path: Path) -> None:
    # A file:// URL goes through the same urllib download and tar unpacking as the real one.
    source = make_fake_ljspeech(tmp_path / "src" / "LJSpeech-1.1", num_clips=4)
    archive = tmp_path / "LJSpeech-1.1.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tar:
        tar.add(source, arcname="LJSpeech-1.1")
    target = tmp_path / "data" / "LJSpeech-1.1"
    done = run_prep("--path_to_ljspeech", target, "--path_to_save", tmp_path / "out", "--download",
                    "--url", archive.as_uri())
    assert done.returncode == 0, done.stderr
    assert (target / "metadata.csv").is_file() and len(list((target / "wavs").glob("*.wav"))) == 4
    assert not (tmp_path / "data" / "LJSpeech-1.1.tar.bz2").exists()  # removed once unpacked
    train, test, _ = read_split(tmp_path / "out")
    assert (len(train), len(test)) == (3, 1) and all(path.startswith(str(target)) for path in train + test)


def test_prep_splits_on_ljspeech_sample(tmp_path: Path) -> None:
    if not (LJSPEECH_SAMPLE / "metadata.csv").is_file():
        pytest.skip(f"needs ../shared/ljspeech_sample ({LJSPEECH_SAMPLE} is absent)")
    done = run_prep("--path_to_ljspeech", LJSPEECH_SAMPLE, "--path_to_save", tmp_path, "--test_size", 3)
    assert done.returncode == 0, done.stderr
    train = read_manifest(tmp_path / "train.csv")
    test = read_manifest(tmp_path / "test.csv")
    metadata = read_manifest(LJSPEECH_SAMPLE / "metadata.csv")
    assert len(test) == 3 and len(train) == len(metadata) - 3
    assert not {r.audio_path for r in train} & {r.audio_path for r in test}
    expected = {str(Path(r.audio_path).resolve()): r.transcript for r in metadata}
    for row in train + test:
        assert expected[str(Path(row.audio_path).resolve())] == row.transcript
        assert sf.info(row.audio_path).samplerate == 22050
