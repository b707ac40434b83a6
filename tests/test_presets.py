"""Presets at every sample rate: consistent parameters, a generator that makes frames x hop samples, two training
steps each, the mel at 24 and 44.1 kHz against the formula written out here, and clips resampled once."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import HANG_TIMEOUT, REPO, write_corpus

import dataset
import train
from dataset import MelDataset
from model import PRESETS, SEGMENT_FRAMES, Generator, HifiGanConfig
from utils import MelConfig, UserError, load_audio, mel_spectrogram

RATES = {"v1": 22050, "v2": 22050, "v3": 22050, "16khz": 16000, "24khz": 24000, "44khz": 44100, "48khz": 48000}


def test_presets_cover_the_rates_with_parameters_that_agree() -> None:
    assert {name: config.sampling_rate for name, config in PRESETS.items()} == RATES
    for name, config in PRESETS.items():
        assert math.prod(config.upsample_rates) == config.hop_size, name
        assert (config.fmax or config.sampling_rate / 2) <= config.sampling_rate / 2, name
        # The STFT window spans ~46 ms at every rate, and the hop ~10.7-16 ms.
        assert 0.040 <= config.window_size / config.sampling_rate <= 0.065, name
        assert 0.010 <= config.hop_size / config.sampling_rate <= 0.017, name
    # The published settings they follow.
    assert (PRESETS["24khz"].num_mels, PRESETS["24khz"].fmax, PRESETS["24khz"].hop_size) == (100, 12000, 256)
    assert (PRESETS["44khz"].num_mels, PRESETS["44khz"].n_fft, PRESETS["44khz"].hop_size) == (128, 2048, 512)
    assert PRESETS["44khz"].fmax is None and PRESETS["16khz"].fmax == 8000



def test_the_mel_settings_are_utils_melconfigs_and_config_json_keeps_its_flat_keys() -> None:
    # HifiGanConfig reads its mel settings off MelConfig (one place to add one), all but the frames and the level,
    # which a vocoder keeps at MelConfig's defaults.
    mel_fields = {f.name: f for f in dataclasses.fields(MelConfig) if f.name not in ("center", "audio_peak")}
    fields = {f.name: f for f in dataclasses.fields(HifiGanConfig)}
    assert [name for name in fields if name in mel_fields] == list(mel_fields)
    for name, field in mel_fields.items():
        assert (fields[name].type, fields[name].default, fields[name].metadata) == \
            (field.type, field.default, field.metadata), name
    # config.json: flat, with the keys, order and defaults it has always had.
    assert json.loads(json.dumps(HifiGanConfig().to_dict())) == {
        "resblock": "1", "upsample_rates": [8, 8, 2, 2], "upsample_kernel_sizes": [16, 16, 4, 4],
        "upsample_initial_channel": 512, "resblock_kernel_sizes": [3, 7, 11],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "mpd_periods": [2, 3, 5, 7, 11],
        "discriminator_width_divisor": 1, "sampling_rate": 22050, "num_mels": 80, "n_fft": 1024, "window_size": 1024,
        "hop_size": 256, "fmin": 0.0, "fmax": 8000.0, "fmax_loss": None, "mel_scale": "log", "min_db": -100.0,
        "max_scaled_abs": 4.0}
    assert list(HifiGanConfig().to_dict())[7:] == ["discriminator_width_divisor", "sampling_rate", "num_mels", "n_fft",
                                                   "window_size", "hop_size", "fmin", "fmax", "fmax_loss", "mel_scale",
                                                   "min_db", "max_scaled_abs"]
    config = PRESETS["24khz"]
    assert config.mel == MelConfig(sampling_rate=24000, num_mels=100, fmax=12000.0)  # uncentred, 0.95 peak
    assert HifiGanConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("name", list(PRESETS))
def test_generator_makes_frames_times_hop_samples(name: str) -> None:
    config = PRESETS[name]
    generator = Generator(config).eval()
    with torch.no_grad():
        for frames in (1, 7, SEGMENT_FRAMES):
            audio = generator(torch.randn(1, config.num_mels, frames))
            assert audio.shape == (1, 1, frames * config.hop_size), (name, frames)
    # The mel of hop-multiple audio has exactly len // hop frames: the generator's input and its output line up.
    samples = 11 * config.hop_size
    mel = mel_spectrogram(torch.zeros(samples), **config.mel_kwargs())
    assert mel.shape == (config.num_mels, 11)


def test_impossible_combinations_are_refused_with_the_fix(tmp_path: Path) -> None:
    base = ["--experiment_name", "x", "--working_directory", str(tmp_path), "--path_to_train_manifest", "a",
            "--path_to_val_manifest", "b"]
    cases = [(["--config", "44khz", "--hop_size", "256"], "multiply to 512"),
             (["--config", "16khz", "--fmax", "11025"], "Nyquist"),
             (["--config", "24khz", "--upsample_kernel_sizes", "16", "15", "4", "4"], "differ from it by an even"),
             (["--config", "44khz", "--segment_size", "8000"], "multiple such as 16384"),
             (["--config", "48khz", "--window_size", "4096"], "raise --n_fft"),
             (["--discriminator_width_divisor", "16"], "choose 1, 2, 4 or 8")]
    for flags, fix in cases:
        with pytest.raises(UserError, match=fix) as error:
            train.build_config(train.parse_args(base + flags))
        assert "\n" not in str(error.value)
    # The default crop is 32 frames of the chosen preset.
    args = train.parse_args(base + ["--config", "44khz"])
    train.build_config(args)
    assert args.segment_size == 16384
    assert train.build_config(train.parse_args(base + ["--config", "v1"])).hop_size == 256


def reference_log_mel(audio: np.ndarray, sampling_rate: int, n_fft: int, hop: int, num_mels: int,
                      fmax: float | None) -> np.ndarray:
    """HiFi-GAN's log-mel written out with numpy alone: Slaney mel scale and area-normalised triangles, a periodic
    Hann window, reflect padding of (n_fft - hop) / 2, frames every hop, sqrt(power + 1e-9), log clamped at 1e-5."""
    def hz_to_mel(hz):  # Slaney: linear below 1 kHz, logarithmic above
        hz = np.asarray(hz, dtype=np.float64)
        return np.where(hz < 1000, hz * 3 / 200, 15 + np.log(np.maximum(hz, 1e-10) / 1000) / (np.log(6.4) / 27))

    def mel_to_hz(mel):
        mel = np.asarray(mel, dtype=np.float64)
        return np.where(mel < 15, mel * 200 / 3, 1000 * np.exp((mel - 15) * np.log(6.4) / 27))

    fmax = sampling_rate / 2 if fmax is None else fmax
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(fmax), num_mels + 2))
    bins = np.linspace(0, sampling_rate / 2, n_fft // 2 + 1)
    filters = np.zeros((num_mels, len(bins)))
    for m in range(num_mels):
        low, centre, high = edges[m:m + 3]
        rising = (bins - low) / (centre - low)
        falling = (high - bins) / (high - centre)
        filters[m] = np.maximum(0, np.minimum(rising, falling)) * 2 / (high - low)
    pad = (n_fft - hop) // 2
    padded = np.pad(audio.astype(np.float64), pad, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = 1 + (len(padded) - n_fft) // hop
    spectrum = np.stack([np.fft.rfft(padded[i * hop:i * hop + n_fft] * window) for i in range(frames)], axis=1)
    magnitude = np.sqrt(spectrum.real ** 2 + spectrum.imag ** 2 + 1e-9)
    return np.log(np.maximum(filters @ magnitude, 1e-5))


@pytest.mark.parametrize("name", ["24khz", "44khz"])
def test_mel_matches_the_formula_written_out(name: str) -> None:
    config = PRESETS[name]
    rate = 44100 if name == "44khz" else config.sampling_rate
    config = dataclasses.replace(config, sampling_rate=rate)
    rng = np.random.default_rng(0)
    t = np.arange(rate // 2) / rate
    audio = (0.4 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t) + 0.05 * rng.standard_normal(len(t)))
    expected = reference_log_mel(audio, rate, config.n_fft, config.hop_size, config.num_mels, config.fmax)
    ours = mel_spectrogram(torch.from_numpy(audio.astype(np.float32)), **config.mel_kwargs()).numpy()
    assert ours.shape == expected.shape == (config.num_mels, len(audio) // config.hop_size)
    # float32 STFT against float64: agreement to ~1e-3 in log units (a wrong filter or frame is off by >0.1).
    assert np.abs(ours - expected).max() < 5e-3, np.abs(ours - expected).max()


def test_clips_at_another_rate_are_resampled_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = write_corpus(tmp_path / "data", 3, seconds=0.4, sampling_rate=48000)
    config = PRESETS["24khz"]
    calls = []
    original = librosa.resample
    monkeypatch.setattr(librosa, "resample", lambda *a, **k: calls.append(1) or original(*a, **k))
    cache = tmp_path / "work" / "resampled" / "24000"
    data = MelDataset(manifest, config, segment_size=4096, resample_cache=cache)
    assert len(calls) == 3 and len(list(cache.glob("*.wav"))) == 3
    for epoch in range(2):
        data.set_epoch(epoch)
        for index in range(len(data)):
            mel, audio, _ = data[index]
            assert audio.shape == (4096,) and mel.shape == (100, 16)
    assert len(calls) == 3, "an epoch resampled again"
    # The copy is the resampled recording at its own level; the dataset's level convention is applied on reading.
    source = data.rows[0].audio_path
    copy = Path(data.audio_paths[0])
    assert sf.info(copy).samplerate == 24000
    np.testing.assert_allclose(sf.read(copy, dtype="float32")[0], load_audio(source, 24000, peak=None), atol=1e-6)
    assert abs(float(np.abs(load_audio(copy, 24000)).max()) - 0.95) < 1e-6
    # A second run finds the copies; an edited recording is resampled anew.
    calls.clear()
    MelDataset(manifest, config, segment_size=4096, resample_cache=cache)
    assert not calls
    audio, rate = sf.read(source)
    sf.write(source, 0.5 * audio, rate)
    MelDataset(manifest, config, segment_size=4096, resample_cache=cache)
    assert len(calls) == 1
    # At the model's rate nothing is copied.
    same = MelDataset(write_corpus(tmp_path / "same", 2, sampling_rate=24000), config, segment_size=4096,
                      resample_cache=tmp_path / "unused")
    assert same.audio_paths == [row.audio_path for row in same.rows] and not (tmp_path / "unused").exists()
    assert dataset.resample_once  # the function train.py relies on


@pytest.mark.slow
def test_every_preset_trains_two_steps(tmp_path: Path) -> None:
    """Each preset as published (full generator width; thin discriminators for speed) trains two steps on 22.05 kHz
    clips, resampled once for the other rates, and exports a generator that makes frames x hop samples."""
    corpus = tmp_path / "data"
    train_manifest = write_corpus(corpus, 2, seconds=0.5, name="train")
    test_manifest = write_corpus(corpus, 1, seconds=0.3, name="test")
    script = tmp_path / "train_presets.py"
    # One process for all presets: the imports and librosa's filter compilation are paid once.
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport train\n"
        f"for name in {list(PRESETS)!r}:\n"
        f"    train.main(['--experiment_name', name, '--working_directory', {str(tmp_path / 'work')!r},\n"
        f"                '--path_to_train_manifest', {str(train_manifest)!r},\n"
        f"                '--path_to_val_manifest', {str(test_manifest)!r}, '--config', name,\n"
        "                '--max_steps', '2', '--batch_size', '1', '--num_workers', '0', '--validation_steps', '2',\n"
        "                '--discriminator_width_divisor', '8', '--mpd_periods', '2', '--report_to', 'none'])\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=HANG_TIMEOUT,
                            env={"PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    from model import load_generator
    for name, rate in RATES.items():
        run = tmp_path / "work" / name
        saved = json.loads((run / "config.json").read_text())
        expected = dataclasses.replace(PRESETS[name], mpd_periods=(2,), discriminator_width_divisor=8)
        assert saved["sampling_rate"] == rate and HifiGanConfig.from_dict(saved) == expected
        assert (run / "checkpoint_2").is_dir(), name
        generator = load_generator(run)
        with torch.no_grad():
            assert generator(torch.zeros(1, generator.config.num_mels, 5)).shape[-1] == 5 * generator.config.hop_size
        copies = list((tmp_path / "work" / "resampled" / str(rate)).glob("*.wav"))
        assert len(copies) == (0 if rate == 22050 else 3), name
        assert all(sf.info(copy).samplerate == rate for copy in copies)
    assert result.stdout.count("validation mel L1") == len(PRESETS)
