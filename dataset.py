"""Training and validation data: (input mel, audio segment, loss mel) from a manifest of wavs.

Pretraining computes the input mel from the audio (DESIGN.md §1). Finetuning (--finetune) reads
teacher-forced mels from `<path_to_saved_mels>/<wav stem>.npy` and crops windows aligned with the
audio: mel frame i belongs to samples [i*hop, (i+1)*hop) (DESIGN.md §4).
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from model import HifiGanConfig
from utils import UserError, check_audio_files, load_audio, mel_spectrogram, read_manifest


class MelDataset(Dataset):
    """Items are (mel [num_mels, frames], audio [samples], loss_mel [num_mels, frames]).

    train=True: random windows of `segment_size` samples (`segment_size // hop` frames); a clip shorter
    than that is zero-padded, not dropped. train=False: whole utterances (trimmed to a whole number of
    hops), for validation.
    """

    def __init__(self, manifest: str | os.PathLike, config: HifiGanConfig, segment_size: int = 8192,
                 train: bool = True, saved_mels_dir: str | os.PathLike | None = None, seed: int = 0,
                 skip_bad_files: bool = False):
        if segment_size % config.hop_size != 0:
            raise UserError(f"--segment_size {segment_size} must be a multiple of --hop_size {config.hop_size}")
        self.rows = read_manifest(manifest, check_files=False)
        problems = check_audio_files(self.rows, min_seconds=config.hop_size / config.sampling_rate)
        report = "\n  ".join(f"line {row.line}: {row.audio_path}: {reason}" for row, reason in problems)
        if problems and not skip_bad_files:
            raise UserError(f"{len(problems)} bad rows in {manifest} (fix them, or pass --skip_bad_files to drop "
                            f"them):\n  {report}")
        if problems:
            bad = {id(row) for row, _ in problems}
            self.rows = [row for row in self.rows if id(row) not in bad]
            warnings.warn(f"--skip_bad_files: dropped {len(problems)} bad rows of {manifest}, kept {len(self.rows)}:"
                          f"\n  {report}", stacklevel=2)
            if not self.rows:
                raise UserError(f"no usable rows left in {manifest}")
        self.manifest = manifest
        self.config = config
        self.segment_size = segment_size
        self.train = train
        self.saved_mels_dir = Path(saved_mels_dir) if saved_mels_dir is not None else None
        self.seed = seed
        # Shared memory, so that persistent DataLoader workers (which keep their own copy of the
        # dataset) see the epoch the main process sets.
        self._epoch = multiprocessing.Value("i", 0, lock=False)
        if self.saved_mels_dir is not None:
            self._check_saved_mels()
        # Build the mel filter banks now, in the main process: DataLoader workers forked later
        # inherit the cache instead of each paying librosa's numba compilation.
        mel_spectrogram(torch.zeros(config.n_fft), **config.mel_kwargs())
        mel_spectrogram(torch.zeros(config.n_fft), **config.mel_kwargs(for_loss=True))

    def set_epoch(self, epoch: int) -> None:
        # Crops are drawn from (seed, epoch, index) rather than a global RNG, so a run resumed
        # mid-epoch sees exactly the crops the interrupted run would have seen.
        self._epoch.value = epoch

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def __len__(self) -> int:
        return len(self.rows)

    def mel_path(self, index: int) -> Path:
        return self.saved_mels_dir / (Path(self.rows[index].audio_path).stem + ".npy")

    def _check_saved_mels(self) -> None:
        """At start-up, not mid-epoch: every clip has its .npy, with the frame count of its audio (±1)."""
        missing, mismatched = [], []
        for index, row in enumerate(self.rows):
            path = self.mel_path(index)
            if not path.is_file():
                missing.append(path.name)
                continue
            shape = np.load(path, mmap_mode="r").shape
            info = sf.info(row.audio_path)
            frames = round(info.frames * self.config.sampling_rate / info.samplerate) // self.config.hop_size
            if len(shape) != 2 or shape[0] != self.config.num_mels or abs(shape[1] - frames) > 1:
                mismatched.append(f"{path.name} {tuple(shape)} vs {frames} frames")
        if missing:
            raise UserError(f"{len(missing)} of {len(self.rows)} clips of {self.manifest} have no mel in "
                            f"{self.saved_mels_dir} (first: {', '.join(missing[:3])}); "
                            "run save_taco_mels.py on this manifest")
        if mismatched:
            raise UserError(f"{len(mismatched)} mels in {self.saved_mels_dir} do not match their audio "
                            f"[{self.config.num_mels}, frames] (first: {'; '.join(mismatched[:3])}); "
                            "re-run save_taco_mels.py with the same mel settings")

    def _mel(self, audio: torch.Tensor, for_loss: bool = False) -> torch.Tensor:
        return mel_spectrogram(audio, **self.config.mel_kwargs(for_loss=for_loss))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hop = self.config.hop_size
        audio = torch.from_numpy(load_audio(self.rows[index].audio_path, self.config.sampling_rate))
        saved_mel = None
        if self.saved_mels_dir is not None:
            saved_mel = torch.from_numpy(np.load(self.mel_path(index)).astype(np.float32))
            # Teacher-forced mels may be a frame off the audio; keep the part both cover.
            frames = min(saved_mel.shape[1], len(audio) // hop)
            saved_mel, audio = saved_mel[:, :frames], audio[:frames * hop]
        else:
            # Whole hops only; a clip shorter than one hop keeps one (zero-padded) frame.
            audio = torch.nn.functional.pad(audio, (0, max(hop - len(audio), 0)))[:max(len(audio) // hop, 1) * hop]

        if not self.train:
            mel = saved_mel if saved_mel is not None else self._mel(audio)
            return mel, audio, self._mel(audio, for_loss=True)

        rng = np.random.default_rng([self.seed, self.epoch, index])
        segment_frames = self.segment_size // hop
        if saved_mel is not None:
            if saved_mel.shape[1] >= segment_frames:
                start = int(rng.integers(0, saved_mel.shape[1] - segment_frames + 1))
                mel = saved_mel[:, start:start + segment_frames]
                audio = audio[start * hop:(start + segment_frames) * hop]
            else:
                mel = torch.nn.functional.pad(saved_mel, (0, segment_frames - saved_mel.shape[1]),
                                              value=float(saved_mel.min()) if saved_mel.numel() else -11.5)
                audio = torch.nn.functional.pad(audio, (0, self.segment_size - len(audio)))
        else:
            if len(audio) >= self.segment_size:
                # Start on a hop boundary, so that the mel of the segment is frame-aligned with the
                # whole clip's mel (the same frames a teacher-forced mel would have).
                start = int(rng.integers(0, (len(audio) - self.segment_size) // hop + 1)) * hop
                audio = audio[start:start + self.segment_size]
            else:
                audio = torch.nn.functional.pad(audio, (0, self.segment_size - len(audio)))
            mel = self._mel(audio)
        return mel, audio, self._mel(audio, for_loss=True)
