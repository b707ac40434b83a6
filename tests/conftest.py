"""Tiny generated data shared by the tests: harmonic 'speech-like' clips and their manifests."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from model import HifiGanConfig  # noqa: E402 (needs the repo on the path)

# The one wall-clock limit the tests put on a child process, a notebook cell or a wait: a guard against a hang
# (deadlock), never a speed check. Work that takes minutes on a slow 2-core machine must never trip it.
HANG_TIMEOUT = 3600  # seconds

# A model small enough that a GAN step takes well under a second on 2 CPU cores.
TINY_FLAGS = ["--upsample_initial_channel", "16", "--upsample_rates", "8", "8", "4",
              "--upsample_kernel_sizes", "16", "16", "8", "--resblock", "2",
              "--resblock_kernel_sizes", "3", "--resblock_dilation_sizes", "((1,2),)",
              "--mpd_periods", "2", "3", "--discriminator_width_divisor", "8", "--segment_size", "2048"]

# The same model as a config object, for tests that build it in-process.
TINY_CONFIG = HifiGanConfig(upsample_initial_channel=16, upsample_rates=(8, 8, 4), upsample_kernel_sizes=(16, 16, 8),
                            resblock="2", resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 2),))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised TINY_CONFIG generator, exported as train.py exports one (folder + config.json)."""
    import torch

    from model import Generator, save_generator
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_generator")
    save_generator(Generator(TINY_CONFIG), folder)
    return folder


def synth_clip(seconds: float, sampling_rate: int = 22050, seed: int = 0) -> np.ndarray:
    """A voiced-speech-like signal: a gliding harmonic tone with an amplitude envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sampling_rate
    audio = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(1, 4) * t))
    audio = audio * envelope + 0.02 * rng.standard_normal(len(t))
    return (0.5 * audio / np.abs(audio).max()).astype(np.float32)


def write_corpus(folder: Path, num_clips: int, seconds: float = 0.6, sampling_rate: int = 22050,
                 name: str = "train") -> Path:
    (folder / "wavs").mkdir(parents=True, exist_ok=True)
    lines = ["file_path,normalized_transcript"]
    for i in range(num_clips):
        path = folder / "wavs" / f"{name}_{i:03d}.wav"
        sf.write(path, synth_clip(seconds + 0.05 * i, sampling_rate, seed=i + (1000 if name != "train" else 0)),
                 sampling_rate, subtype="PCM_16")
        lines.append(f"wavs/{path.name},clip number {i}")
    manifest = folder / f"{name}.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(train manifest, test manifest): 8 + 2 synthetic clips of ~0.6 s at 22.05 kHz."""
    folder = tmp_path_factory.mktemp("corpus")
    return write_corpus(folder, 8, name="train"), write_corpus(folder, 2, name="test")


def shared_path(*parts: str) -> Path:
    """A path under ../shared; tests using it skip when it is absent (a user's fresh clone has no ../shared)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared exists only in the developers' and CI's checkouts)")
    return path
