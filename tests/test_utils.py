"""The one mel function (docs/design.md §1), audio loading and manifests."""

import math
import re
import warnings

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import synth_clip, write_corpus

import utils
from utils import UserError, db_mel_to_log_mel, load_audio, log_mel_to_db_mel, mel_spectrogram, read_manifest

MEL = dict(sampling_rate=22050, n_fft=1024, num_mels=80, hop_size=256, window_size=1024, fmin=0, fmax=8000)


def reference_log_mel(audio: np.ndarray, center: bool = False) -> np.ndarray:
    """The same formula computed independently in numpy (framing by hand, numpy FFT).

    center=True is NVIDIA Tacotron2's STFT: reflect padding of n_fft / 2, len // hop + 1 frames.
    """
    n_fft, hop = 1024, 256
    pad = n_fft // 2 if center else (n_fft - hop) // 2
    padded = np.pad(audio.astype(np.float64), (pad, pad), mode="reflect")
    frames = 1 + (len(padded) - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    spectrum = np.stack([np.fft.rfft(padded[i * hop:i * hop + n_fft] * window) for i in range(frames)], axis=1)
    magnitude = np.sqrt(spectrum.real ** 2 + spectrum.imag ** 2 + 1e-9)
    basis = librosa.filters.mel(sr=22050, n_fft=n_fft, n_mels=80, fmin=0, fmax=8000)
    return np.log(np.maximum(basis @ magnitude, 1e-5))


@pytest.mark.parametrize("length", [22050, 22050 + 100, 5 * 256])
def test_log_mel_matches_independent_formula_and_frame_count(length):
    audio = synth_clip(length / 22050 + 0.01)[:length]
    mel = mel_spectrogram(torch.from_numpy(audio), **MEL)
    assert mel.shape == (80, length // 256)
    assert np.abs(mel.numpy() - reference_log_mel(audio)).max() < 1e-3


def test_db_mel_matches_independent_formula_without_a_ceiling():
    # 20·log10(clamp(mel, 10^(min_db/20))), [min_db, 0] dB mapped linearly onto [-4, 4]; floored, never clipped
    # at the top: a loud clip's mel goes above 0 dB (LJSpeech reaches ~+18 dB) and must keep its level.
    audio = synth_clip(0.5, seed=3) * 1.9  # peak 0.95
    mel = np.exp(reference_log_mel(audio))  # undo the log; its clamp at 1e-5 is 10^(-100/20), the dB floor
    db = 20 * np.log10(np.maximum(mel, 10 ** (-100 / 20)))
    expected = (db + 100) / 100 * 8 - 4
    got = mel_spectrogram(torch.from_numpy(audio), **MEL, mel_scale="db", min_db=-100.0, max_scaled_abs=4.0)
    assert db.max() > 3  # above 0 dB: the seed's clip at +4 would have flattened these frames
    assert expected.min() < 0 < 4 < expected.max()
    assert np.abs(got.numpy() - expected).max() < 1e-3
    # the conversion between the scales is exact in both directions above the floor
    log_mel = mel_spectrogram(torch.from_numpy(audio), **MEL)
    assert torch.allclose(db_mel_to_log_mel(got), log_mel, atol=1e-4)


@pytest.mark.parametrize("length", [22050, 22050 + 100])
def test_centered_frames_match_nvidia_formula_and_line_up_half_a_hop_later(length):
    audio = synth_clip(length / 22050 + 0.01, seed=4)[:length]
    centered = mel_spectrogram(torch.from_numpy(audio), **MEL, center=True)
    assert centered.shape == (80, length // 256 + 1)  # NVIDIA's STFT: one frame more
    assert np.abs(centered.numpy() - reference_log_mel(audio, center=True)).max() < 1e-3
    # Frame i of the centred mel is centred on sample i*hop, the vocoder's frame i on i*hop + hop/2: with the
    # audio delayed by hop/2 the two agree (away from the first frames, where the padding differs).
    delayed = np.concatenate([np.zeros(128, np.float32), audio])
    shifted = mel_spectrogram(torch.from_numpy(delayed), **MEL)
    frames = min(shifted.shape[1], centered.shape[1])
    assert (shifted[:, 3:frames] - centered[:, 3:frames]).abs().max() < 1e-3
    # ...and at equal index, without the shift, they are far apart
    plain = mel_spectrogram(torch.from_numpy(audio), **MEL)
    assert (plain[:, 3:plain.shape[1]] - centered[:, 3:plain.shape[1]]).abs().mean() > 0.05


def test_batched_equals_single_and_db_scale_is_affine_image():
    audio = torch.from_numpy(np.stack([synth_clip(0.5, seed=1), synth_clip(0.5, seed=2)]))
    batched = mel_spectrogram(audio, **MEL)
    assert torch.allclose(batched[1], mel_spectrogram(audio[1], **MEL), atol=1e-5)
    db = mel_spectrogram(audio, **MEL, mel_scale="db")
    assert db.min() >= -4
    assert torch.allclose(db, log_mel_to_db_mel(batched), atol=1e-4)
    inside = db > -3.99
    assert torch.allclose(db_mel_to_log_mel(db)[inside], batched[inside], atol=1e-4)
    # natural log, clamped at 1e-5: silence sits exactly at log(1e-5)
    silent = mel_spectrogram(torch.zeros(4096), **MEL)
    assert torch.allclose(silent, torch.full_like(silent, math.log(1e-5)))


def test_load_audio_int16_stereo_resampled_and_peak_normalised(tmp_path, monkeypatch):
    # The warning is said once per process; another test may already have said it.
    monkeypatch.setattr(utils, "_warned_resample", set())
    clip = synth_clip(0.5, sampling_rate=44100)
    clip[100] = -1.0  # the loudest sample is negative: normalising by max() would overshoot
    stereo = np.stack([clip, 0.5 * clip], axis=1)
    sf.write(tmp_path / "a.wav", (stereo * 32767).astype(np.int16), 44100, subtype="PCM_16")
    with pytest.warns(UserWarning, match="resampling"):
        audio = load_audio(tmp_path / "a.wav", 22050)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 11025) <= 1
    assert abs(np.abs(audio).max() - 0.95) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second 44.1 kHz file must not repeat it
        load_audio(tmp_path / "a.wav", 22050)


def test_load_audio_bad_file_names_it(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    with pytest.raises(UserError, match=r"bad\.wav"):
        load_audio(tmp_path / "bad.wav", 22050)


def test_manifest_formats_and_missing_file(tmp_path):
    csv_manifest = write_corpus(tmp_path / "csv", 3)
    rows = read_manifest(csv_manifest)
    assert len(rows) == 3 and rows[0].transcript == "clip number 0" and rows[0].audio_path.endswith("train_000.wav")
    lj = tmp_path / "lj"
    (lj / "wavs").mkdir(parents=True)
    sf.write(lj / "wavs" / "LJ001-0001.wav", synth_clip(0.2), 22050)
    (lj / "metadata.csv").write_text("LJ001-0001|Dr. Smith, 1 st.|Doctor Smith, one st.\n")
    rows = read_manifest(lj / "metadata.csv")
    assert rows[0].transcript == "Doctor Smith, one st." and rows[0].audio_path.endswith("wavs/LJ001-0001.wav")
    (lj / "metadata.csv").write_text("LJ001-0001|a|a\nLJ001-0002|b|b\n")
    with pytest.raises(UserError, match=r"line 2: audio file .*LJ001-0002.wav does not exist"):
        read_manifest(lj / "metadata.csv")


def test_write_manifest_reads_back_and_leaves_no_partial_file(tmp_path):
    csv_manifest = write_corpus(tmp_path / "corpus", 2)
    rows = read_manifest(csv_manifest)
    rows[0].speaker, rows[1].transcript = "p225", None
    utils.write_manifest(tmp_path / "absolute.csv", rows)
    lines = (tmp_path / "absolute.csv").read_text().splitlines()
    assert lines[0] == "file_path,normalized_transcript,speaker" and lines[1].startswith(str(tmp_path))
    again = read_manifest(tmp_path / "absolute.csv")
    assert [(r.audio_path, r.transcript, r.speaker) for r in again] == [
        (rows[0].audio_path, "clip number 0", "p225"), (rows[1].audio_path, None, None)]
    # relative paths and no speaker column: a corpus that can move (make_demo_corpus.py's manifests)
    utils.write_manifest(tmp_path / "corpus" / "moved.csv", rows, relative=True, speakers=False)
    assert (tmp_path / "corpus" / "moved.csv").read_text().splitlines()[1:] == [
        "wavs/train_000.wav,clip number 0", "wavs/train_001.wav,"]
    assert sorted(p.name for p in tmp_path.rglob("*.partial")) == []


def test_unique_stems_names_both_files(tmp_path):
    a, b, c = tmp_path / "x" / "clip.wav", tmp_path / "y" / "clip.npy", tmp_path / "x" / "other.wav"
    assert utils.unique_stems([a, c], ".wav") == [a, c]
    with pytest.raises(UserError, match=re.escape(f"{a} and {b} would both be saved as clip.wav; rename one")):
        utils.unique_stems([a, c, b], ".wav")
    with pytest.raises(UserError, match=r"would both be saved as clip\.npy"):
        utils.unique_stems([a, a], ".npy")
    # one file listed twice (two manifests) is kept once when asked; labels say where each item came from
    items = [("train.csv", a), ("test.csv", tmp_path / "x" / ".." / "x" / "clip.wav"), ("test.csv", c)]
    kept = utils.unique_stems(items, ".npy", path=lambda item: item[1], same_file_once=True)
    assert kept == [items[0], items[2]]
    with pytest.raises(UserError, match=r"clip\.wav \(train\.csv\) and .*clip\.npy \(test\.csv\)"):
        utils.unique_stems([("train.csv", a), ("test.csv", b)], ".npy", path=lambda item: item[1],
                           label=lambda item: f"{item[1]} ({item[0]})", same_file_once=True)


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert utils.pick_device("auto") == utils.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device cuda, but torch sees no CUDA device; use --device cpu or auto"):
        utils.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert utils.pick_device() == torch.device("cuda") and utils.pick_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("outcome, status", [("ok", 0), ("int", 3), ("user_error", 1)])
def test_run_cli_exit_status_and_one_line_messages(outcome, status, capsys):
    def main():
        warnings.warn("mind the gap", UserWarning, stacklevel=1)
        if outcome == "user_error":
            raise UserError("bad.wav is empty; remove the row")
        return 3 if outcome == "int" else object()

    showwarning = warnings.showwarning
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(main)
    assert exit_info.value.code == status and warnings.showwarning is showwarning  # restored on the way out
    err = capsys.readouterr().err
    assert "warning: mind the gap\n" in err and "test_utils.py" not in err
    assert ("error: bad.wav is empty; remove the row\n" in err) == (outcome == "user_error")
