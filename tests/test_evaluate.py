"""evaluate.py end to end: a tiny generator and Griffin-Lim on two tiny clips; the real V2 weights on real speech."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import REPO, TINY_CONFIG, shared_path, synth_clip

import evaluate
from tacotron2 import Tacotron2, Tacotron2Config, save_tacotron2
from utils import UserError

TINY = TINY_CONFIG
# Columns every synthesised system fills on aligned mels, whatever its quality (PESQ and F0 RMSE may be
# legitimately undefined for a random generator's output).
ALWAYS_DEFINED = ["DNSMOS P.808", "DNSMOS overall", "log-mel L1", "MCD (dB)", "STOI", "V/UV error", "RTF",
                  "× real time"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_tiny_checkpoint_and_griffin_lim_end_to_end(tmp_path, tiny_corpus, tiny_checkpoint, monkeypatch):
    _, test_manifest = tiny_corpus
    output = tmp_path / "eval"
    tracked = []  # pitch tracks: the reference's once per clip, then one per synthesised system and clip
    track = evaluate.metrics.f0_track
    monkeypatch.setattr(evaluate.metrics, "f0_track",
                        lambda audio, rate: tracked.append(len(audio)) or track(audio, rate))
    results = evaluate.main(["--manifest", str(test_manifest), "--vocoder", f"tiny={tiny_checkpoint}",
                             "--griffin_lim", "--device", "cpu", "--output_dir", str(output)])

    assert [row["system"] for row in results] == ["ground truth", "tiny", "griffin_lim"]
    table = read_csv(output / "results.csv")
    assert list(table[0]) == evaluate.COLUMNS
    assert [row["system"] for row in table] == ["ground truth", "tiny", "griffin_lim"]
    markdown = (output / "results.md").read_text()
    assert markdown.splitlines()[0] == evaluate.markdown_header(evaluate.COLUMNS)
    assert "| log-mel L1 † |" in markdown and "| DNSMOS P.808 |" in markdown and "† Compared with" in markdown
    assert all(f"- {note}\n" in markdown for note in evaluate.COLUMN_NOTES.values())  # what each column leans to
    assert evaluate.UTMOS_MISSING in markdown  # no UTMOS weights on this machine

    ground_truth, *systems = results
    assert all(math.isfinite(ground_truth[c]) for c in ("DNSMOS P.808", "DNSMOS overall"))
    assert all(ground_truth[c] is None for c in evaluate.REFERENCE_COLUMNS)  # the recordings vs themselves
    for row in systems:
        for column in ALWAYS_DEFINED:
            assert math.isfinite(row[column]), (row["system"], column)
        assert row["PESQ-WB"] is None or 1.0 <= row["PESQ-WB"] <= 4.65
    assert math.isfinite(systems[1]["PESQ-WB"])  # Griffin-Lim's output is speech-like enough for PESQ
    for system in ("tiny", "griffin_lim"):
        assert sorted(p.name for p in (output / system).glob("*.wav")) == ["test_000.wav", "test_001.wav"]
    assert len(read_csv(output / "results_per_clip.csv")) == 2 * 3
    assert not (output / "results_per_speaker.csv").exists()  # one speaker: the overall row says it all
    assert len(tracked) == 2 + 2 * 2
    for row in systems:  # the conventional RTF and its inverse
        assert row["RTF"] == pytest.approx(1 / row["× real time"])
    # every system is compared with the recording at the recording's level (peak 0.5, not normalised to 0.95)
    recorded, _ = sf.read(test_manifest.parent / "wavs" / "test_000.wav", dtype="float32")
    resynthesised, _ = sf.read(output / "griffin_lim" / "test_000.wav", dtype="float32")
    assert abs(np.abs(recorded).max() - 0.5) < 0.01
    assert 0.75 < resynthesised.std() / recorded[:len(resynthesised)].std() < 1.3


def test_per_speaker_means(tmp_path, tiny_corpus):
    """A manifest with a speaker column: each system's means per speaker beside the overall one."""
    _, test_manifest = tiny_corpus
    rows = read_csv(test_manifest)
    manifest = tmp_path / "speakers.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_path", "normalized_transcript", "speaker"])
        for row, speaker in zip(rows, ["anna", "bert"]):
            writer.writerow([str(test_manifest.parent / row["file_path"]), row["normalized_transcript"], speaker])
    output = tmp_path / "eval"
    results = evaluate.main(["--manifest", str(manifest), "--griffin_lim", "--griffin_lim_iters", "4",
                             "--device", "cpu", "--output_dir", str(output)])

    per_clip = read_csv(output / "results_per_clip.csv")
    assert {(row["clip"], row["speaker"]) for row in per_clip} == {("test_000", "anna"), ("test_001", "bert")}
    per_speaker = read_csv(output / "results_per_speaker.csv")
    assert [(row["system"], row["speaker"], row["clips"]) for row in per_speaker] == [
        ("ground truth", "anna", "1"), ("ground truth", "bert", "1"), ("griffin_lim", "anna", "1"),
        ("griffin_lim", "bert", "1")]
    # one clip per speaker: each speaker's mean is that clip's score, and the overall mean is their mean
    clip_scores = {(row["system"], row["speaker"]): float(row["log-mel L1"]) for row in per_clip
                   if row["system"] == "griffin_lim"}
    for row in per_speaker[2:]:
        assert float(row["log-mel L1"]) == pytest.approx(clip_scores[(row["system"], row["speaker"])])
    overall = next(row for row in results if row["system"] == "griffin_lim")["log-mel L1"]
    assert overall == pytest.approx(sum(clip_scores.values()) / 2)
    assert "Per speaker (2 speakers" in (output / "results.md").read_text()


def test_tacotron2_teacher_forced_and_free_running_mels(tmp_path, tiny_corpus, tiny_checkpoint):
    _, test_manifest = tiny_corpus
    torch.manual_seed(0)
    tacotron = Tacotron2(Tacotron2Config(symbols_embedding_dim=16, encoder_embedding_dim=16, decoder_rnn_dim=24,
                                         prenet_dim=8, attention_rnn_dim=24, attention_dim=8,
                                         attention_location_n_filters=4, attention_location_kernel_size=7,
                                         postnet_embedding_dim=12))
    taco = tmp_path / "taco"
    # Trained (say) on the normalised-dB mel: evaluate converts the vocoder's log mel to it and back.
    save_tacotron2(tacotron, taco, extra={"audio": {"sampling_rate": 22050, "hop_size": 256, "mel_scale": "db"}})
    common = ["--manifest", str(test_manifest), "--vocoder", str(tiny_checkpoint), "--taco_weights", str(taco),
              "--max_clips", "1", "--device", "cpu"]

    forced = evaluate.main(common + ["--output_dir", str(tmp_path / "forced")])
    name = tiny_checkpoint.name  # no NAME= given: the folder names the system
    assert [row["system"] for row in forced] == ["ground truth", name]
    assert math.isfinite(forced[1]["log-mel L1"]) and math.isfinite(forced[1]["MCD (dB)"])
    assert "teacher-forced" in (tmp_path / "forced" / "results.md").read_text()

    save_tacotron2(tacotron, tmp_path / "taco_16k", extra={"audio": {"sampling_rate": 16000}})
    with pytest.raises(UserError, match=r"make different mels \(sampling_rate 16000 \(22050\)"):
        evaluate.main(["--manifest", str(test_manifest), "--vocoder", str(tiny_checkpoint),
                       "--taco_weights", str(tmp_path / "taco_16k"), "--output_dir", str(tmp_path)])

    # A random Tacotron2 may never fire its stop token: the step limit keeps the run short.
    free = evaluate.main(common + ["--free_running", "--max_decoder_steps", "12",
                                   "--output_dir", str(tmp_path / "free")])
    assert math.isfinite(free[1]["DNSMOS P.808"])
    assert all(free[1][c] is None for c in evaluate.REFERENCE_COLUMNS)  # not aligned with the recording


def test_vocoder_names_and_flag_errors(tmp_path, tiny_corpus):
    assert evaluate.parse_vocoder_spec("v2=/ckpt/g_02500000") == ("v2", "/ckpt/g_02500000")
    assert evaluate.parse_vocoder_spec("/ckpt/generator_v2") == ("generator_v2", "/ckpt/generator_v2")
    assert evaluate.parse_vocoder_spec("work_dir/run/") == ("run", "work_dir/run/")
    repeated = evaluate.parse_args(["--manifest", "m.csv", "--vocoder", "a=x", "b=y", "--vocoder", "c=z",
                                    "--output_dir", "o"])
    assert repeated.vocoder == ["a=x", "b=y", "c=z"]
    _, test_manifest = tiny_corpus
    out = ["--output_dir", str(tmp_path)]
    with pytest.raises(UserError, match="nothing to evaluate"):
        evaluate.main(["--manifest", str(test_manifest)] + out)
    with pytest.raises(UserError, match="--free_running needs --taco_weights"):
        evaluate.main(["--manifest", str(test_manifest), "--griffin_lim", "--free_running"] + out)


def bad_manifest(tmp_path: Path, test_manifest: Path) -> Path:
    """The two good test clips with an empty file and a corrupt one between and after them."""
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really a wav file" * 40)
    clips = [test_manifest.parent / "wavs" / "test_000.wav", tmp_path / "empty.wav",
             test_manifest.parent / "wavs" / "test_001.wav", tmp_path / "corrupt.wav"]
    manifest = tmp_path / "bad.csv"
    manifest.write_text("file_path\n" + "".join(f"{clip}\n" for clip in clips))
    return manifest


def test_bad_rows_stop_the_run_before_the_first_clip_or_are_skipped(tmp_path, tiny_corpus):
    _, test_manifest = tiny_corpus
    manifest = bad_manifest(tmp_path, test_manifest)
    flags = ["--manifest", str(manifest), "--griffin_lim", "--griffin_lim_iters", "2", "--device", "cpu"]
    with pytest.raises(UserError, match=r"2 bad rows .*\n  line 3: .*empty.wav: .*\n  line 5: .*corrupt.wav: "
                                        r"unreadable"):
        evaluate.main(flags + ["--output_dir", str(tmp_path / "stopped")])
    assert not list((tmp_path / "stopped").rglob("*.wav"))  # not one clip was scored first

    with pytest.warns(UserWarning, match=r"--skip_bad_files: dropped 2 bad rows .*kept 2"):
        results = evaluate.main(flags + ["--skip_bad_files", "--output_dir", str(tmp_path / "skipped")])
    assert math.isfinite(results[1]["log-mel L1"])
    assert "2 clips, ground-truth mels" in (tmp_path / "skipped" / "results.md").read_text()
    assert [(row["system"], row["clip"]) for row in read_csv(tmp_path / "skipped" / "results_per_clip.csv")] == [
        (system, clip) for system in ("ground truth", "griffin_lim") for clip in ("test_000", "test_001")]


def test_a_rerun_continues_where_a_failed_run_stopped(tmp_path, tiny_corpus, monkeypatch):
    """A clip that passes the start-up check but fails to decode stops the run; the clips scored before it are kept
    in results_per_clip.csv, and the rerun scores only the rest (or drops the clip with --skip_bad_files)."""
    _, test_manifest = tiny_corpus
    output = tmp_path / "eval"
    flags = ["--manifest", str(test_manifest), "--griffin_lim", "--griffin_lim_iters", "3", "--device", "cpu",
             "--output_dir", str(output)]
    load_audio = evaluate.load_audio

    def failing_load_audio(path, *args, **kwargs):
        if Path(path).name == "test_001.wav":
            raise UserError(f"cannot read audio file {path}: decoding failed")
        return load_audio(path, *args, **kwargs)

    monkeypatch.setattr(evaluate, "load_audio", failing_load_audio)
    with pytest.raises(UserError, match=r"line 3: .*decoding failed\nThe scores so far are kept"):
        evaluate.main(flags)
    first = read_csv(output / "results_per_clip.csv")
    assert [(row["system"], row["clip"]) for row in first] == [("ground truth", "test_000"),
                                                               ("griffin_lim", "test_000")]

    with pytest.warns(UserWarning, match="line 3 dropped: .*decoding failed"):
        skipped = evaluate.main(flags + ["--skip_bad_files"])
    assert "1 clip, ground-truth mels" in (output / "results.md").read_text()
    monkeypatch.setattr(evaluate, "load_audio", load_audio)
    with open(output / "results_per_clip.csv", "a") as handle:  # a row cut short by a crash: scored again
        handle.write("test_001,,griffin_lim,2.3")

    synthesised = []
    synthesise = evaluate.synthesise
    monkeypatch.setattr(evaluate, "synthesise", lambda system, mel, iters: synthesised.append(mel.shape[1]) or
                        synthesise(system, mel, iters))
    results = evaluate.main(flags)
    frames = [evaluate.mel_spectrogram(torch.from_numpy(evaluate.load_audio(test_manifest.parent / "wavs" /
                                                                            f"test_00{i}.wav", 22050, peak=None)),
                                       **TINY.mel_kwargs()).shape[1] for i in (0, 1)]
    assert synthesised[1:] == [frames[1]]  # a warm-up, then test_001 alone
    per_clip = read_csv(output / "results_per_clip.csv")
    assert [(row["system"], row["clip"]) for row in per_clip] == [
        (system, clip) for system in ("ground truth", "griffin_lim") for clip in ("test_000", "test_001")]
    assert per_clip[2] == first[1]  # test_000's scores as the first run wrote them
    assert results[1]["log-mel L1"] == pytest.approx(np.mean([float(row["log-mel L1"]) for row in per_clip[2:]]))
    assert skipped[1]["log-mel L1"] == pytest.approx(float(first[1]["log-mel L1"]))

    # Other settings for a system: its clips are scored anew.
    synthesised.clear()
    evaluate.main(flags[:4] + ["4"] + flags[5:])
    assert synthesised[1:] == frames


def test_cli_reports_user_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--manifest", str(tmp_path / "none.csv"),
                             "--griffin_lim", "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.startswith("error: manifest") and "Traceback" not in result.stderr


@pytest.mark.slow
def test_hifigan_v2_beats_griffin_lim_shared_fixture(tmp_path):
    weights = shared_path("fixtures", "generator_v2")
    wavs = shared_path("ljspeech_sample", "wavs")
    manifest = tmp_path / "short.csv"  # the two shortest clips (1.8 s, 1.9 s) keep this test quick
    manifest.write_text(f"file_path\n{wavs / 'LJ001-0008.wav'}\n{wavs / 'LJ001-0002.wav'}\n")
    with pytest.warns(UserWarning, match="HiFi-GAN V2"):
        results = evaluate.main(["--manifest", str(manifest), "--vocoder", f"hifigan_v2={weights}", "--griffin_lim",
                                 "--device", "cpu", "--output_dir", str(tmp_path / "eval")])
    rows = {row["system"]: row for row in results}
    hifigan, griffin_lim = rows["hifigan_v2"], rows["griffin_lim"]
    assert hifigan["DNSMOS P.808"] > griffin_lim["DNSMOS P.808"]
    assert hifigan["DNSMOS overall"] > griffin_lim["DNSMOS overall"] + 0.2
    assert hifigan["log-mel L1"] < griffin_lim["log-mel L1"]
    assert hifigan["MCD (dB)"] < griffin_lim["MCD (dB)"]
    # Measured with the official code on these clips: PESQ-WB ~2.98, STOI ~0.96, log-mel L1 ~0.33.
    assert 2.2 < hifigan["PESQ-WB"] < 3.6
    assert hifigan["STOI"] > 0.9
    assert hifigan["log-mel L1"] < 0.45
    # The leans the table's notes state. PESQ compares 16 kHz power spectra, which Griffin-Lim rebuilds closely from
    # the mel, and hardly hears its phase artefacts: it prefers Griffin-Lim (3.29 against 2.72 here).
    assert griffin_lim["PESQ-WB"] > hifigan["PESQ-WB"]
    # Log-mel L1 prefers HiFi-GAN for the band above the input mel's fmax (8 kHz), which Griffin-Lim leaves empty: on
    # the input mel's own band Griffin-Lim is the closer to the recording (~0.12 against ~0.32).
    config = evaluate.HifiGanConfig()  # V2's mel: the V1 preset's
    band_l1 = {}
    for system in ("hifigan_v2", "griffin_lim"):
        pairs = []
        for stem in ("LJ001-0008", "LJ001-0002"):
            recording, _ = sf.read(wavs / f"{stem}.wav", dtype="float32")
            vocoded, _ = sf.read(tmp_path / "eval" / system / f"{stem}.wav", dtype="float32")
            mels = evaluate.mel_spectrogram(torch.from_numpy(np.stack([recording[:len(vocoded)], vocoded])),
                                            **config.mel_kwargs())
            pairs.append((mels[0] - mels[1]).abs().mean().item())
        band_l1[system] = np.mean(pairs)
    assert band_l1["griffin_lim"] < 0.6 * band_l1["hifigan_v2"], band_l1


@pytest.mark.slow
def test_cli_warnings_are_one_line_each(tmp_path):
    """A warning on the command line reads `warning: <message>`: no source file, line number or code line."""
    sf.write(tmp_path / "clip16k.wav", synth_clip(0.6, 16000), 16000)  # load_audio warns that it resamples
    (tmp_path / "test.csv").write_text("file_path\nclip16k.wav\n")
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--manifest", str(tmp_path / "test.csv"),
                             "--griffin_lim", "--griffin_lim_iters", "2", "--device", "cpu", "--output_dir",
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    warned = [line for line in result.stderr.splitlines() if "resampling" in line]
    assert warned and all(line.startswith("warning: ") for line in warned), result.stderr[-2000:]
    assert "UserWarning" not in result.stderr and ".py:" not in result.stderr
