"""prep_splits.py beyond LJSpeech: folders of audio, LibriTTS and VCTK layouts, speaker-aware splits, the survey."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from prep_splits import detect_corpus, prep_splits, split_by_speaker
from utils import ManifestRow, UserError, interleave_speakers, read_manifest

REPO = Path(__file__).resolve().parents[1]


def tone(path: Path, seconds: float = 0.3, sampling_rate: int = 24000, channels: int = 1, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    audio = 0.3 * np.sin(2 * np.pi * 220 * t)
    sf.write(path, np.stack([audio] * channels, axis=1) if channels > 1 else audio, sampling_rate, **kwargs)
    return path


def make_libritts(root: Path) -> Path:
    """LibriTTS(-R)'s layout: <subset>/<speaker>/<chapter>/<speaker>_<chapter>_<a>_<b>.wav + .normalized.txt."""
    for subset, speakers in (("train-clean-100", ("19", "26")), ("dev-clean", ("84",))):
        for speaker in speakers:
            for utt in range(4):
                stem = f"{speaker}_198_{utt:06d}_000000"
                wav = tone(root / subset / speaker / "198" / f"{stem}.wav")
                wav.with_name(f"{stem}.normalized.txt").write_text(f"Speaker {speaker} says {utt}.")
                wav.with_name(f"{stem}.original.txt").write_text(f"SPEAKER {speaker} SAYS {utt}")
    (root / "train-clean-100" / "19" / "198" / "19_198.trans.tsv").write_text("not read\n")
    return root


def make_vctk(root: Path) -> Path:
    """VCTK 0.92: wav48_silence_trimmed/<spk>/<spk>_<nnn>_mic{1,2}.flac at 48 kHz, txt/<spk>/<spk>_<nnn>.txt."""
    for speaker in ("p225", "p226", "p315"):
        for utt in range(1, 4):
            for mic in ("mic1", "mic2"):
                tone(root / "wav48_silence_trimmed" / speaker / f"{speaker}_{utt:03d}_{mic}.flac", sampling_rate=48000)
            if speaker != "p315":  # as in the real corpus: p315 has no transcripts
                text = root / "txt" / speaker / f"{speaker}_{utt:03d}.txt"
                text.parent.mkdir(parents=True, exist_ok=True)
                text.write_text(f"Please call Stella {utt}.\n")
    return root


def run_prep(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "prep_splits.py"), *map(str, args)], capture_output=True,
                          text=True, check=False)


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_layouts_are_recognised(tmp_path: Path) -> None:
    assert detect_corpus(make_libritts(tmp_path / "LibriTTS")) == "libritts"
    assert detect_corpus(tmp_path / "LibriTTS" / "dev-clean") == "libritts"  # one subset on its own
    assert detect_corpus(make_vctk(tmp_path / "VCTK")) == "vctk"
    tone(tmp_path / "mine" / "a.wav")
    assert detect_corpus(tmp_path / "mine") == "folder"


def test_libritts_manifests_carry_speakers_and_normalized_text(tmp_path: Path) -> None:
    corpus = make_libritts(tmp_path / "LibriTTS")
    done = run_prep("--path_to_corpus", corpus, "--path_to_save", tmp_path / "out", "--test_size", 3)
    assert done.returncode == 0, done.stderr
    assert "libritts corpus" in done.stdout and "12 clips" in done.stdout and "3 speakers" in done.stdout
    assert "24000 Hz x 12" in done.stdout
    train, test = rows_of(tmp_path / "out" / "train.csv"), rows_of(tmp_path / "out" / "test.csv")
    assert list(train[0]) == ["file_path", "normalized_transcript", "speaker"]
    assert len(train) == 9 and len(test) == 3
    # Three test clips from three speakers in turn: each a seen speaker.
    assert sorted(row["speaker"] for row in test) == ["19", "26", "84"]
    for row in train + test:
        stem = Path(row["file_path"]).stem
        speaker, _, utt, _ = stem.split("_")
        assert row["speaker"] == speaker and row["normalized_transcript"] == f"Speaker {speaker} says {int(utt)}."
    # The manifest reads back with its speakers.
    assert {row.speaker for row in read_manifest(tmp_path / "out" / "train.csv")} == {"19", "26", "84"}


def test_vctk_mic1_flacs_with_and_without_transcripts(tmp_path: Path) -> None:
    corpus = make_vctk(tmp_path / "VCTK-Corpus-0.92")
    written = prep_splits(corpus, tmp_path / "out", test_size=2)
    rows = [row for manifest in written for row in rows_of(manifest.path)]
    assert len(rows) == 9 and all(row["file_path"].endswith("_mic1.flac") for row in rows)
    by_name = {Path(row["file_path"]).name: row for row in rows}
    assert by_name["p225_002_mic1.flac"]["normalized_transcript"] == "Please call Stella 2."
    assert by_name["p315_001_mic1.flac"]["normalized_transcript"] == ""  # no text, still vocoder data
    assert {row["speaker"] for row in rows} == {"p225", "p226", "p315"}
    mic2 = prep_splits(corpus, tmp_path / "mic2", test_size=2, vctk_mic="mic2")
    assert all(row["file_path"].endswith("_mic2.flac") for m in mic2 for row in rows_of(m.path))


def test_older_vctk_layout(tmp_path: Path) -> None:
    root = tmp_path / "VCTK-Corpus"
    for speaker in ("p225", "p226"):
        for utt in (1, 2):
            tone(root / "wav48" / speaker / f"{speaker}_{utt:03d}.wav", sampling_rate=48000)
            (root / "txt" / speaker).mkdir(parents=True, exist_ok=True)
            (root / "txt" / speaker / f"{speaker}_{utt:03d}.txt").write_text("Hello.")
    written = prep_splits(root, tmp_path / "out", test_size=1)
    rows = [row for manifest in written for row in rows_of(manifest.path)]
    assert len(rows) == 4 and all(row["normalized_transcript"] == "Hello." for row in rows)


def test_folder_with_bad_files_transcripts_and_mixed_rates(tmp_path: Path) -> None:
    root = tmp_path / "my_voice"
    tone(root / "alice" / "one.wav")
    tone(root / "alice" / "session2" / "two.flac", sampling_rate=44100)
    tone(root / "alice" / "three.wav", channels=2)
    tone(root / "bob" / "four.ogg", subtype="VORBIS", sampling_rate=16000)
    tone(root / "bob" / "five.wav")
    tone(root / "bob" / "blip.wav", seconds=0.01)  # too short
    (root / "bob" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")  # unreadable
    (root / "bob" / "notes.txt").write_text("not audio")
    tone(root / ".cache" / "hidden.wav")  # hidden folders are skipped
    transcripts = tmp_path / "texts.txt"
    transcripts.write_text("alice/one.wav|First.\nalice/session2/two|Second.\nfour\tFourth.\nghost|Nobody.\n")
    done = run_prep("--path_to_corpus", root, "--path_to_save", tmp_path / "out", "--transcripts", transcripts,
                    "--test_size", 1, "--seed", 4)
    # One bad file does not stop the run: both are reported with their reasons, the rest is split.
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "folder corpus" in out and "5 clips" in out and "2 speakers" in out
    assert "16000 Hz x 1, 24000 Hz x 3, 44100 Hz x 1" in out
    assert "left out 2 clip(s) (1 too short, 1 unreadable)" in out
    assert "blip.wav: 0.010 s" in out and "broken.wav: unreadable" in out
    assert "1 clip(s) have several channels" in out
    assert "1 line(s) of" in out and "ghost" in out  # a transcript that names no file
    rows = rows_of(tmp_path / "out" / "train.csv") + rows_of(tmp_path / "out" / "test.csv")
    text = {Path(row["file_path"]).name: row["normalized_transcript"] for row in rows}
    assert text == {"one.wav": "First.", "two.flac": "Second.", "three.wav": "", "four.ogg": "Fourth.",
                    "five.wav": ""}
    assert {Path(row["file_path"]).name: row["speaker"] for row in rows}["two.flac"] == "alice"


def test_files_directly_in_the_folder_are_one_speaker(tmp_path: Path) -> None:
    for i in range(10):
        tone(tmp_path / "solo" / f"{i}.wav")
    written = prep_splits(tmp_path / "solo", tmp_path / "out")
    assert [m.num_clips for m in written] == [9, 1] and written[0].num_speakers == 1
    assert {row["speaker"] for m in written for row in rows_of(m.path)} == {"solo"}


def speakers_corpus(clips_per_speaker: dict[str, int]) -> list[ManifestRow]:
    return [ManifestRow(f"/c/{name}_{i}.wav", None, 0, name) for name, count in clips_per_speaker.items()
            for i in range(count)]


def test_speaker_aware_split_keeps_each_test_speaker_in_training() -> None:
    rows = speakers_corpus({"a": 10, "b": 5, "c": 1, "d": 2})
    train, test, unseen = split_by_speaker(rows, test_size=6, seed=0)
    assert not unseen and len(test) == 6 and len(train) == 12
    assert {row.speaker for row in test} <= {row.speaker for row in train}
    assert {row.speaker for row in train} == {"a", "b", "c", "d"}  # c's only clip and d's last stay in training
    counts = {name: sum(row.speaker == name for row in test) for name in "abcd"}
    # In turns: a, b, d; then a, b (d has given its one); then a or b.
    assert counts["c"] == 0 and counts["d"] == 1 and sorted((counts["a"], counts["b"])) == [2, 3]
    # The same seed gives the same split, another seed another one.
    assert split_by_speaker(rows, 6, 0) == (train, test, unseen)
    assert split_by_speaker(rows, 6, 1)[1] != test
    with pytest.raises(UserError, match="at most 14 test clips"):
        split_by_speaker(rows, 15, 0)


def test_held_out_speakers_never_reach_training() -> None:
    rows = speakers_corpus({name: 4 for name in "abcdef"})
    train, test, unseen = split_by_speaker(rows, test_size=3, seed=5, num_test_speakers=2)
    held = {row.speaker for row in unseen}
    assert len(held) == 2 and len(unseen) == 8
    assert not held & {row.speaker for row in train + test}
    train, test, unseen = split_by_speaker(rows, test_size=3, seed=5, test_speakers=["b", "e"])
    assert {row.speaker for row in unseen} == {"b", "e"}
    for names, count, message in ((None, 6, "must leave a speaker"), (["b", "zed"], 0, "zed"),
                                  (list("abcdef"), 0, "every speaker"), (["a"], 1, "not both")):
        with pytest.raises(UserError, match=message):
            split_by_speaker(rows, 3, 0, names, count)


def test_unseen_speaker_manifest_is_written(tmp_path: Path) -> None:
    corpus = make_libritts(tmp_path / "LibriTTS")
    done = run_prep("--path_to_corpus", corpus, "--path_to_save", tmp_path / "out", "--test_speakers", "84",
                    "--test_size", 2)  # LibriTTS speakers are numbers: names, not a count
    assert done.returncode == 0, done.stderr
    unseen = rows_of(tmp_path / "out" / "test_unseen_speakers.csv")
    assert len(unseen) == 4 and {row["speaker"] for row in unseen} == {"84"}
    assert "84" not in {row["speaker"] for row in rows_of(tmp_path / "out" / "train.csv")}
    assert "4 unseen-speaker test clips, 1 speaker(s)" in done.stdout


def test_official_split_of_another_corpus_and_transcripts_elsewhere_are_refused(tmp_path: Path) -> None:
    corpus = make_vctk(tmp_path / "VCTK")
    done = run_prep("--path_to_corpus", corpus, "--path_to_save", tmp_path / "out", "--split", "official")
    assert done.returncode == 1 and "use --split random" in done.stderr and len(done.stderr.splitlines()) == 1
    done = run_prep("--path_to_corpus", corpus, "--path_to_save", tmp_path / "out", "--transcripts", corpus / "x")
    assert done.returncode == 1 and "--corpus folder" in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_prep("--path_to_corpus", empty, "--path_to_save", tmp_path / "out")
    assert done.returncode == 1 and "no audio found" in done.stderr
    assert not (tmp_path / "out").exists()


def test_interleave_speakers_takes_each_speaker_in_turn() -> None:
    rows = speakers_corpus({"a": 3, "b": 1, "c": 2})
    assert [rows[i].audio_path for i in interleave_speakers(rows)] == [
        "/c/a_0.wav", "/c/b_0.wav", "/c/c_0.wav", "/c/a_1.wav", "/c/c_1.wav", "/c/a_2.wav"]
    assert interleave_speakers(speakers_corpus({"x": 3})) == [0, 1, 2]
