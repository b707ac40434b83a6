"""prep_splits.py: the official split by default, the seeded random one, the CLI's errors and --download."""

from __future__ import annotations

import csv
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import synth_clip

from prep_splits import OFFICIAL_SPLIT_DIR, load_official_ids, prep_splits, resolve_test_size
from utils import UserError, read_manifest

REPO = Path(__file__).resolve().parents[1]
LJSPEECH_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "ljspeech_sample"
NUM_CLIPS = 20

# Real ids of the official lists, in LJSpeech's order; the validation file lists LJ050-0269 first, so corpus
# order and file order differ. LJ051-0001 is in neither list (LJSpeech's chapters end at LJ050).
OFFICIAL_CORPUS = [("LJ001-0001", "train"), ("LJ001-0002", "train"), ("LJ001-0028", "test"),
                   ("LJ002-0149", "test"), ("LJ050-0250", "train"), ("LJ050-0269", "test"), ("LJ051-0001", None)]


def make_fake_ljspeech(folder: Path, num_clips: int = NUM_CLIPS, prefix: str = "LJ001") -> Path:
    """An LJSpeech-shaped folder: metadata.csv (raw and normalized columns differ) and short sine wavs."""
    (folder / "wavs").mkdir(parents=True)
    lines = []
    for i in range(num_clips):
        clip_id = f"{prefix}-{i + 1:04d}"
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


def make_official_ljspeech(folder: Path) -> tuple[Path, dict[str, float]]:
    """OFFICIAL_CORPUS as an LJSpeech folder of speech-like clips; also returns each clip's duration in seconds."""
    (folder / "wavs").mkdir(parents=True)
    lines, seconds = [], {}
    for i, (clip_id, _) in enumerate(OFFICIAL_CORPUS):
        seconds[clip_id] = 0.2 + 0.1 * i
        sf.write(folder / "wavs" / f"{clip_id}.wav", synth_clip(seconds[clip_id], seed=i), 22050, subtype="PCM_16")
        lines.append(f"{clip_id}|Clip {i}.|Clip number {i}.")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, seconds


@pytest.fixture(scope="module")
def official_ljspeech(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    return make_official_ljspeech(tmp_path_factory.mktemp("lj_official") / "LJSpeech-1.1")


def run_prep(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "prep_splits.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, check=False)


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


def ids(paths: list[str]) -> list[str]:
    return [Path(path).stem for path in paths]


def test_official_split_is_the_default(official_ljspeech: tuple[Path, dict[str, float]], tmp_path: Path) -> None:
    corpus, _ = official_ljspeech
    # Run from elsewhere: the id lists are found beside prep_splits.py, not in the working directory.
    done = run_prep("--path_to_ljspeech", corpus, "--path_to_save", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    train, test, train_rows = read_split(tmp_path / "out")
    # Exactly the listed ids, in corpus order (not the order of the id files).
    assert ids(test) == [clip_id for clip_id, part in OFFICIAL_CORPUS if part == "test"]
    assert ids(train) == [clip_id for clip_id, part in OFFICIAL_CORPUS if part == "train"]
    assert train_rows[0]["normalized_transcript"] == "Clip number 0."
    assert "official split" in done.stdout
    assert "3 train clips" in done.stdout and "3 test clips" in done.stdout and " h -> " in done.stdout
    # The clip in neither list is reported, not silently dropped; so are the listed ids this corpus lacks.
    assert "1 clip(s)" in done.stdout and "LJ051-0001" in done.stdout and "left out" in done.stdout
    assert "13094 id(s)" in done.stdout and "147 validation, 12947 training" in done.stdout
    assert "not comparable" in done.stdout  # a partial test set is not the published one


def test_official_split_reports_hours(official_ljspeech: tuple[Path, dict[str, float]], tmp_path: Path) -> None:
    corpus, seconds = official_ljspeech
    train, test = prep_splits(corpus, tmp_path)
    for manifest, part in ((train, "train"), (test, "test")):
        expected = sum(seconds[clip_id] for clip_id, where in OFFICIAL_CORPUS if where == part) / 3600
        assert manifest.num_clips == 3 and manifest.hours == pytest.approx(expected, rel=1e-3)
    assert (train.path, test.path) == (tmp_path / "train.csv", tmp_path / "test.csv")


def test_official_id_lists_in_the_repo() -> None:
    assert OFFICIAL_SPLIT_DIR == REPO / "data" / "ljspeech_official_split"
    training, validation = load_official_ids()
    assert (len(training), len(validation)) == (12950, 150)
    assert len(set(training)) == 12950 and len(set(validation)) == 150
    assert not set(training) & set(validation)
    assert all(len(clip_id) == 10 and clip_id.startswith("LJ") for clip_id in training + validation)
    assert validation[0] == "LJ050-0269" and training[0] == "LJ001-0001"


def test_official_split_of_another_corpus_says_to_use_random(tmp_path: Path) -> None:
    # No official id at all (not LJSpeech), and only training ids (a small LJSpeech subset): one split is empty.
    for prefix in ("XX001", "LJ001"):
        corpus = make_fake_ljspeech(tmp_path / prefix / "LJSpeech-1.1", num_clips=4, prefix=prefix)
        done = run_prep("--path_to_ljspeech", corpus, "--path_to_save", tmp_path / prefix / "out")
        assert_one_line_error(done, "--split random", "test.csv", "empty")
        assert not (tmp_path / prefix / "out" / "train.csv").exists()


def test_random_only_flags_with_the_official_split_are_one_line_errors(fake_ljspeech: Path, tmp_path: Path) -> None:
    for flag, value in (("--test_size", 5), ("--seed", 1)):
        done = run_prep("--path_to_ljspeech", fake_ljspeech, "--path_to_save", tmp_path, flag, value)
        assert_one_line_error(done, flag, "--split random")
    assert not (tmp_path / "train.csv").exists()


def test_split_is_deterministic_disjoint_and_complete(fake_ljspeech: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    done = run_prep("--path_to_ljspeech", fake_ljspeech, "--path_to_save", first, "--split", "random",
                    "--test_size", 5, "--seed", 3)
    assert done.returncode == 0, done.stderr
    assert "15 train clips" in done.stdout and "5 test clips" in done.stdout and str(first / "train.csv") in done.stdout
    assert run_prep("--path_to_ljspeech", fake_ljspeech, "--path_to_save", second, "--split", "random",
                    "--test_size", 5, "--seed", 3).returncode == 0
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
                        "--split", "random", "--test_size", 5, "--seed", seed).returncode == 0
        tests.append(set(read_split(tmp_path / str(seed))[1]))
    assert tests[0] != tests[1]


def test_default_test_size_is_capped_for_a_small_corpus(fake_ljspeech: Path, tmp_path: Path) -> None:
    done = run_prep("--path_to_ljspeech", fake_ljspeech, "--path_to_save", tmp_path, "--split", "random")
    assert done.returncode == 0, done.stderr
    train, test, _ = read_split(tmp_path)
    assert (len(train), len(test)) == (18, 2)
    # On a full-size corpus the default stays LJSpeech's usual 150.
    assert resolve_test_size(None, 13100) == 150
    with pytest.raises(UserError):
        resolve_test_size(None, 1)


def test_too_large_test_size_is_a_one_line_error(fake_ljspeech: Path, tmp_path: Path) -> None:
    done = run_prep("--path_to_ljspeech", fake_ljspeech, "--path_to_save", tmp_path, "--split", "random",
                    "--test_size", NUM_CLIPS)
    assert_one_line_error(done, "--test_size", str(NUM_CLIPS))
    assert not (tmp_path / "train.csv").exists()


def test_missing_metadata_is_a_one_line_error_and_a_missing_wav_is_left_out(tmp_path: Path) -> None:
    assert_one_line_error(run_prep("--path_to_ljspeech", tmp_path / "nowhere", "--path_to_save", tmp_path / "out"),
                          "metadata.csv", "--download")
    corpus = make_fake_ljspeech(tmp_path / "LJSpeech-1.1", num_clips=4)
    (corpus / "wavs" / "LJ001-0003.wav").unlink()
    done = run_prep("--path_to_ljspeech", corpus, "--path_to_save", tmp_path / "out", "--split", "random")
    assert done.returncode == 0, done.stderr
    # Reported with its row, and the other three clips split.
    assert "left out 1 clip(s) (1 missing)" in done.stdout and "LJ001-0003.wav (line 3): missing" in done.stdout
    train, test, _ = read_split(tmp_path / "out")
    assert sorted(ids(train + test)) == ["LJ001-0001", "LJ001-0002", "LJ001-0004"]


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
    done = run_prep("--path_to_ljspeech", target, "--path_to_save", tmp_path / "out", "--split", "random",
                    "--download", "--url", archive.as_uri())
    assert done.returncode == 0, done.stderr
    assert (target / "metadata.csv").is_file() and len(list((target / "wavs").glob("*.wav"))) == 4
    assert not (tmp_path / "data" / "LJSpeech-1.1.tar.bz2").exists()  # removed once unpacked
    train, test, _ = read_split(tmp_path / "out")
    assert (len(train), len(test)) == (3, 1) and all(path.startswith(str(target)) for path in train + test)


def test_prep_splits_on_ljspeech_sample(tmp_path: Path) -> None:
    if not (LJSPEECH_SAMPLE / "metadata.csv").is_file():
        pytest.skip(f"needs ../shared/ljspeech_sample ({LJSPEECH_SAMPLE} is absent)")
    done = run_prep("--path_to_ljspeech", LJSPEECH_SAMPLE, "--path_to_save", tmp_path, "--split", "random",
                    "--test_size", 3)
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
