"""make_demo_corpus.py: the espeak-ng demo corpus, its manifests, idempotency and the espeak fallbacks."""

from __future__ import annotations

import ast
import csv
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import make_demo_corpus
from make_demo_corpus import SAMPLING_RATE, SENTENCES, build_demo_corpus
from utils import UserError, read_manifest

REPO = Path(__file__).resolve().parents[1]


def _has_espeak() -> bool:
    try:
        make_demo_corpus.get_synthesizer()
    except UserError:
        return False
    return True


needs_espeak = pytest.mark.skipif(not _has_espeak(), reason="espeak-ng not installed (pip install espeakng-loader)")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not _has_espeak():
        pytest.skip("espeak-ng not installed (pip install espeakng-loader)")
    return build_demo_corpus(tmp_path_factory.mktemp("demo"), num_sentences=3, num_test=1)


def test_sentence_list_is_usable_text() -> None:
    assert len(SENTENCES) >= 48 and len(set(SENTENCES)) == len(SENTENCES)
    for sentence in SENTENCES:
        assert 4 <= len(sentence.split()) <= 15, sentence
        assert not re.search(r"\d", sentence), f"digits must be spelled out: {sentence}"


def test_corpus_files_are_22khz_mono_speech(small_corpus: tuple[Path, Path]) -> None:
    train_path, test_path = small_corpus
    for row in read_manifest(train_path) + read_manifest(test_path):
        info = sf.info(row.audio_path)
        assert info.samplerate == SAMPLING_RATE and info.channels == 1 and info.subtype == "PCM_16"
        assert 0.5 <= info.duration <= 15.0, (row.audio_path, info.duration)
        audio, _ = sf.read(row.audio_path, dtype="float32")
        assert np.sqrt(np.mean(audio**2)) > 0.02, f"{row.audio_path} is (nearly) silent"
        assert np.abs(audio).max() < 1.0, f"{row.audio_path} clips"


def test_manifests_are_relative_disjoint_and_match_the_text(small_corpus: tuple[Path, Path]) -> None:
    train_path, test_path = small_corpus
    with open(train_path, newline="", encoding="utf-8") as handle:
        raw = list(csv.DictReader(handle))
    assert list(raw[0]) == ["file_path", "normalized_transcript"]
    assert all(row["file_path"].startswith("wavs/demo_") for row in raw)  # relative, so the folder can move

    train, test = read_manifest(train_path), read_manifest(test_path)
    assert (len(train), len(test)) == (2, 1)
    assert not {row.audio_path for row in train} & {row.audio_path for row in test}
    for row in train + test:
        index = int(Path(row.audio_path).stem.split("_")[1]) - 1
        assert row.transcript == SENTENCES[index]


def test_second_build_is_a_no_op_and_overwrite_rebuilds(tmp_path: Path) -> None:
    if not _has_espeak():
        pytest.skip("espeak-ng not installed")
    train_path, _ = build_demo_corpus(tmp_path, num_sentences=2, num_test=1)
    wav = Path(read_manifest(train_path)[0].audio_path)
    os.utime(wav, ns=(1_000_000_000, 1_000_000_000))  # an old mtime, so a rewrite cannot go unnoticed
    manifest_mtime = train_path.stat().st_mtime_ns

    build_demo_corpus(tmp_path, num_sentences=2, num_test=1)
    assert wav.stat().st_mtime_ns == 1_000_000_000
    assert train_path.stat().st_mtime_ns == manifest_mtime

    build_demo_corpus(tmp_path, num_sentences=2, num_test=1, overwrite=True)
    assert wav.stat().st_mtime_ns != 1_000_000_000


def test_incomplete_corpus_is_completed(tmp_path: Path) -> None:
    if not _has_espeak():
        pytest.skip("espeak-ng not installed")
    train_path, _ = build_demo_corpus(tmp_path, num_sentences=2, num_test=1)
    wav = Path(read_manifest(train_path)[0].audio_path)
    wav.unlink()
    build_demo_corpus(tmp_path, num_sentences=2, num_test=1)
    assert wav.is_file()
    # A different size is not "complete" either.
    train_path, test_path = build_demo_corpus(tmp_path, num_sentences=4, num_test=2)
    assert (len(read_manifest(train_path)), len(read_manifest(test_path))) == (2, 2)


@needs_espeak
def test_speaking_rate_parameter_takes_effect() -> None:
    synthesize = make_demo_corpus.get_synthesizer()
    slow, rate = synthesize(SENTENCES[0], 120, 50, 50)
    fast, _ = synthesize(SENTENCES[0], 220, 50, 50)
    assert rate > 0 and len(slow) > 1.3 * len(fast)
    rates = {make_demo_corpus.prosody(i)[0] for i in range(48)}
    assert len(rates) > 10 and min(rates) >= 140 and max(rates) <= 200


def test_bad_sizes_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--num_test"):
        build_demo_corpus(tmp_path, num_sentences=3, num_test=3)
    with pytest.raises(UserError, match="--num_sentences"):
        build_demo_corpus(tmp_path, num_sentences=len(SENTENCES) + 1)


def test_without_espeak_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # makes `import espeakng_loader` fail
    monkeypatch.setattr(make_demo_corpus.shutil, "which", lambda name: None)
    # __wrapped__ bypasses the per-process cache, which may already hold the real library.
    with pytest.raises(UserError, match="pip install espeakng-loader"):
        make_demo_corpus.get_synthesizer.__wrapped__()


def test_binary_fallback_is_used_and_resampled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in `espeak-ng` that records its arguments and writes one second at 16 kHz, so the
    # fallback's command line and the resampling to 22050 Hz are both exercised.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "espeak-ng"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, numpy as np, soundfile as sf
        args = sys.argv[1:]
        open({str(tmp_path / 'args.txt')!r}, 'a').write(repr(args) + '\\n')
        t = np.arange(16000) / 16000
        sf.write(args[args.index('-w') + 1], 0.5 * np.sin(2 * np.pi * 200 * t), 16000, subtype='PCM_16')
        """))
    fake.chmod(0o755)
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    synthesize = make_demo_corpus.get_synthesizer.__wrapped__()
    monkeypatch.setattr(make_demo_corpus, "get_synthesizer", lambda: synthesize)

    train_path, _ = build_demo_corpus(tmp_path / "corpus", num_sentences=2, num_test=1)
    info = sf.info(read_manifest(train_path)[0].audio_path)
    assert info.samplerate == SAMPLING_RATE and abs(info.duration - 1.0) < 0.01
    calls = [ast.literal_eval(line) for line in (tmp_path / "args.txt").read_text().splitlines()]
    assert len(calls) == 2
    assert calls[0][calls[0].index("-v") + 1] == "en-us" and calls[0][-1] == SENTENCES[0]


@needs_espeak
def test_cli_reports_seconds_and_rejects_bad_flags(tmp_path: Path) -> None:
    script = str(REPO / "make_demo_corpus.py")
    done = subprocess.run([sys.executable, script, "--out_dir", str(tmp_path), "--num_sentences", "2",
                           "--num_test", "1"], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    seconds = float(re.search(r"([\d.]+) s of audio", done.stdout).group(1))
    assert 1.0 < seconds < 30.0
    bad = subprocess.run([sys.executable, script, "--out_dir", str(tmp_path), "--num_sentences", "2",
                          "--num_test", "2"], capture_output=True, text=True, cwd=REPO, check=False)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
