"""metrics.py on known answers: identical signals, two noise levels, silence, pure tones, real speech."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import shared_path, synth_clip

import metrics
from model import HifiGanConfig
from utils import UserError, load_audio

RATE = 22050
CONFIG = HifiGanConfig()


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return synth_clip(1.5, RATE, seed=3)


def noisy(audio: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    return (audio + level * np.random.default_rng(seed).standard_normal(len(audio))).astype(np.float32)


def tone(frequency: float, seconds: float = 1.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * frequency * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def all_metrics(reference: np.ndarray, degraded: np.ndarray) -> dict:
    f0_rmse, vuv = metrics.f0_rmse_and_vuv(reference, degraded, RATE)
    return {"log_mel_l1": metrics.log_mel_l1(reference, degraded, CONFIG),
            "mcd": metrics.mel_cepstral_distortion(reference, degraded, RATE),
            "mcd_dtw": metrics.mel_cepstral_distortion(reference, degraded, RATE, use_dtw=True),
            "pesq": metrics.pesq_wb(reference, degraded, RATE), "stoi": metrics.stoi(reference, degraded, RATE),
            "f0_rmse": f0_rmse, "vuv": vuv}


def test_identical_audio_scores_perfect(clip):
    scores = all_metrics(clip, clip)
    assert scores["log_mel_l1"] == 0.0
    assert scores["mcd"] == 0.0 and scores["mcd_dtw"] == 0.0
    assert scores["pesq"] > 4.4
    assert scores["stoi"] > 0.99
    assert scores["f0_rmse"] == pytest.approx(0.0, abs=1e-6)
    assert scores["vuv"] == 0.0


def test_more_noise_scores_worse_on_every_metric(clip):
    light, heavy = all_metrics(clip, noisy(clip, 0.01)), all_metrics(clip, noisy(clip, 0.1))
    perfect = all_metrics(clip, clip)
    for name in ("log_mel_l1", "mcd", "mcd_dtw", "f0_rmse"):
        assert perfect[name] < light[name] < heavy[name], name
    for name in ("pesq", "stoi"):
        assert perfect[name] > light[name] > heavy[name], name
    # Light noise leaves every voicing decision alone; heavy noise flips some.
    assert perfect["vuv"] <= light["vuv"] < heavy["vuv"]


@pytest.mark.parametrize("alpha", [0.0, 0.45, 0.55])
def test_mel_cepstrum_recovers_the_warped_cosine_series_it_was_built_from(alpha):
    """The SPTK definition, written out independently: ln|H(w)| = sum_m c(m) cos(m b(w)) on the all-pass-warped
    frequency b(w); the analysis must give c back (alpha 0: the plain cepstrum)."""
    order = 12
    mel_cepstrum = np.random.default_rng(1).normal(0, 0.3, order + 1) / (1 + np.arange(order + 1))
    w = np.linspace(0, np.pi, 2049)
    warped = w + 2 * np.arctan(alpha * np.sin(w) / (1 - alpha * np.cos(w)))
    log_amplitude = np.cos(np.outer(warped, np.arange(order + 1))) @ mel_cepstrum
    recovered = metrics.mel_cepstrum(np.exp(2 * log_amplitude), order, alpha)
    np.testing.assert_allclose(recovered, mel_cepstrum, atol=1e-9)


def test_mcd_is_the_papers_scale_and_ignores_loudness(clip):
    """c_0 is excluded: a gain changes nothing. A signal whose log amplitude spectrum is tilted by exactly one
    mel-cepstral coefficient, c(1) = 0.1, is 10/ln(10) * sqrt(2) * 0.1 = 0.614 dB away (up to frame windowing)."""
    assert metrics.mel_cepstral_distortion(clip, 0.5 * clip, RATE) == pytest.approx(0.0, abs=1e-6)
    alpha = metrics.MCEP_PARAMETERS[22050][1]
    n_fft = 1024
    spectrum = np.fft.rfft(clip)
    w = np.linspace(0, np.pi, len(spectrum))
    warped = w + 2 * np.arctan(alpha * np.sin(w) / (1 - alpha * np.cos(w)))
    tilted = np.fft.irfft(spectrum * np.exp(0.1 * np.cos(warped)), n=len(clip)).astype(np.float32)
    expected = 10 / math.log(10) * math.sqrt(2) * 0.1
    assert n_fft == 2 ** round(math.log2(0.046 * RATE))
    assert metrics.mel_cepstral_distortion(clip, tilted, RATE) == pytest.approx(expected, rel=0.05)


def test_lengths_are_cropped_to_the_shorter_and_tensors_accepted(clip):
    longer = np.concatenate([clip, noisy(np.zeros(300, dtype=np.float32), 0.3)])
    assert metrics.log_mel_l1(torch.from_numpy(longer), clip, CONFIG) == 0.0
    assert metrics.mel_cepstral_distortion(clip, torch.from_numpy(longer), RATE) == 0.0
    assert metrics.stoi(longer, clip, RATE) > 0.99


@pytest.mark.parametrize("silent", ["reference", "degraded", "both"])
def test_silence_gives_no_nan_and_no_exception(clip, silent):
    silence = np.zeros_like(clip)
    reference = silence if silent in ("reference", "both") else clip
    degraded = silence if silent in ("degraded", "both") else clip
    scores = all_metrics(reference, degraded)
    for name, value in scores.items():
        assert value is None or math.isfinite(value), (name, value)
    if silent == "both":
        assert scores["log_mel_l1"] == 0.0 and scores["mcd"] == 0.0 and scores["vuv"] == 0.0
    if silent == "reference":  # nothing to compare against: undefined, not a number
        assert scores["pesq"] is None and scores["stoi"] is None
    if silent == "degraded":  # the worst output there is
        assert scores["pesq"] == 1.0 and scores["vuv"] > 0.5
    dnsmos = metrics.dnsmos(silence, RATE)
    assert dnsmos is None or all(math.isfinite(v) for v in dnsmos.values())


def test_clips_too_short_for_pesq_and_stoi_give_none(clip):
    short = clip[:int(0.2 * RATE)]
    assert metrics.pesq_wb(short, short, RATE) is None  # PESQ needs 0.25 s
    assert metrics.stoi(short, short, RATE) is None  # STOI needs ~0.4 s of speech
    assert metrics.log_mel_l1(short, short, CONFIG) == 0.0


def test_f0_rmse_in_cents_of_pure_tones():
    rmse, vuv = metrics.f0_rmse_and_vuv(tone(150), tone(150), RATE)
    assert rmse == pytest.approx(0.0, abs=1.0) and vuv == 0.0
    rmse, vuv = metrics.f0_rmse_and_vuv(tone(150), tone(300), RATE)
    assert rmse == pytest.approx(1200.0, abs=30.0)  # an octave is 1200 cents
    assert vuv < 0.05
    # the reference tracked once and handed in scores the same, also against a slightly longer output
    reference_track = metrics.f0_track(tone(150), RATE)
    assert metrics.f0_rmse_and_vuv(tone(150), tone(300), RATE, reference_track) == (rmse, vuv)
    longer = np.concatenate([tone(300), tone(300)[:RATE // 50]])
    rmse_longer, vuv_longer = metrics.f0_rmse_and_vuv(tone(150), longer, RATE, reference_track)
    assert rmse_longer == pytest.approx(rmse, abs=5.0) and vuv_longer < 0.05


def test_dnsmos_warns_once_and_returns_none_without_the_package(monkeypatch, clip):
    monkeypatch.setitem(sys.modules, "speechmos", None)  # makes `import speechmos` raise ImportError
    metrics._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="pip install speechmos"):
        assert metrics.dnsmos(clip, RATE) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.dnsmos(clip, RATE) is None  # said once only


def test_utmos_is_none_without_weights(monkeypatch, tmp_path, clip):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    assert metrics.find_utmos(None) is None
    assert metrics.utmos(clip, RATE, None) is None
    with pytest.raises(UserError, match="do not exist; download https://"):
        metrics.utmos(clip, RATE, str(tmp_path / "missing.pt"))


def test_utmos_finds_the_weights_and_scores_16khz_audio(monkeypatch, tmp_path, clip):
    """Detection and the call into utmos.py (whose own tests check the model); the real weights are not on CI."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert metrics.find_utmos(None) is None
    (hub / "checkpoints").mkdir(parents=True)
    cached = hub / "checkpoints" / metrics.utmos22.UTMOS_WEIGHTS
    cached.write_bytes(b"weights")
    assert metrics.find_utmos(None) == cached
    assert metrics.find_utmos(str(hub / "checkpoints")) == cached  # a folder holding the file
    loaded, waves = [], []
    monkeypatch.setattr(metrics.utmos22, "load_utmos", lambda path: loaded.append(path) or "model")
    monkeypatch.setattr(metrics.utmos22, "score", lambda model, wave: waves.append(wave) or torch.tensor([3.25]))
    metrics._load_utmos.cache_clear()
    assert metrics.utmos(clip, RATE, None) == pytest.approx(3.25)
    assert metrics.utmos(clip, RATE, str(cached)) == pytest.approx(3.25)
    assert loaded == [cached]  # loaded once, then cached
    assert waves[0].dtype == torch.float32
    # Resampled as the reference UTMOS resamples (inside its model, torchaudio's windowed sinc), not by resample_poly.
    assert torch.equal(waves[0], metrics.utmos22.resample(torch.from_numpy(clip)[None], RATE))
    assert metrics.utmos(clip[:500], RATE, None) is None  # shorter than the model's first frame at 16 kHz
    metrics._load_utmos.cache_clear()


def test_dnsmos_separates_real_speech_from_noisy_speech_shared_fixture():
    pytest.importorskip("speechmos")
    speech = load_audio(shared_path("ljspeech_sample", "wavs", "LJ001-0001.wav"), RATE)
    clean, degraded = metrics.dnsmos(speech, RATE), metrics.dnsmos(np.clip(noisy(speech, 0.3), -1, 1), RATE)
    assert clean["p808"] > 3.5 and clean["ovrl"] > 2.8
    assert clean["p808"] > degraded["p808"] + 1.0
    assert clean["ovrl"] > degraded["ovrl"] + 1.0
