"""Training and validation data: (input mel, audio segment, loss mel) from a manifest of wavs.

Pretraining computes the input mel from the audio, peak-normalised to 0.95 as the official recipe does.
Finetuning (--finetune) reads teacher-forced mels from `<path_to_saved_mels>/<wav stem>.npy` and crops windows
aligned with the audio, read the way the Tacotron2 read it: `taco_mels.json`, written by save_taco_mels.py beside
the mels, holds the level convention (NVIDIA's Tacotron2: the recorded level) and the frame shift (NVIDIA's
centred frames: frame i belongs to the samples [i*hop - hop/2, (i+1)*hop - hop/2)).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from model import HifiGanConfig
from utils import UserError, check_audio_files, load_audio, mel_spectrogram, read_manifest

SAVED_MELS_INFO = "taco_mels.json"
# A folder written before save_taco_mels.py recorded its conventions: it always peak-normalised to 0.95
# and used the vocoder's own frames.
LEGACY_SAVED_MELS = {"audio_peak": 0.95, "frame_shift": 0}


def read_saved_mels_info(folder: str | os.PathLike) -> dict:
    """How the teacher-forced mels in `folder` were made: level (`audio_peak`), `frame_shift`, `mel` settings."""
    path = Path(folder) / SAVED_MELS_INFO
    if not path.is_file():
        return dict(LEGACY_SAVED_MELS)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not readable JSON ({error}); re-run save_taco_mels.py --overwrite") from None
    return {**LEGACY_SAVED_MELS, **info}


def check_saved_mels_info(folder: str | os.PathLike, info: dict, overwrite: bool = False) -> None:
    """Refuse to add mels made one way to a folder of mels made another way: they would need different audio."""
    folder = Path(folder)
    if overwrite or not folder.is_dir() or not any(folder.glob("*.npy")):
        return
    existing = read_saved_mels_info(folder)
    changed = [f"{key} {existing[key]} -> {info[key]}" for key in ("audio_peak", "frame_shift", "mel")
               if key in existing and existing[key] != info[key]]
    if changed:
        raise UserError(f"{folder} already holds mels made with other settings ({'; '.join(changed)}); write into "
                        "another --path_to_save, or pass --overwrite to redo every clip")


def write_saved_mels_info(folder: str | os.PathLike, info: dict) -> None:
    path = Path(folder) / SAVED_MELS_INFO
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def resample_once(rows: list, sampling_rate: int, cache_dir: str | os.PathLike) -> list[str]:
    """The audio file to read for each row: the row's own at `sampling_rate`, or a copy resampled once into
    `cache_dir` (float32 wav, the recorded level kept), so that no epoch pays for resampling again.

    A copy is named after the source's path, size and modification time: an edited source is resampled anew. Copies
    are written under a temporary name and renamed, so processes sharing the cache never read half a file.
    """
    cache_dir = Path(cache_dir)
    paths, todo = [], []
    for row in rows:
        if sf.info(row.audio_path).samplerate == sampling_rate:
            paths.append(row.audio_path)
            continue
        stat = os.stat(row.audio_path)
        key = hashlib.sha1(f"{os.path.abspath(row.audio_path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
        copy = cache_dir / f"{Path(row.audio_path).stem}-{key[:12]}.wav"
        paths.append(str(copy))
        if not copy.is_file():
            todo.append((row.audio_path, copy))
    if todo:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for source, copy in tqdm(todo, desc=f"resampling to {sampling_rate} Hz once (cache: {cache_dir})",
                                 unit="clip"):
            with warnings.catch_warnings():  # load_audio says it resamples; here that is the point
                warnings.simplefilter("ignore")
                audio = load_audio(source, sampling_rate, peak=None)
            partial = copy.with_name(f".{copy.stem}.{os.getpid()}.partial.wav")
            sf.write(str(partial), audio, sampling_rate, subtype="FLOAT")
            os.replace(partial, copy)
    return paths


REPORT_LINES = 20  # bad rows listed in an error or warning; a longer list goes in full to a file


def drop_bad_rows(rows: list, problems: list[tuple], manifest: str | os.PathLike, skip_bad_files: bool,
                  report_dir: str | os.PathLike | None = None) -> list:
    """All bad rows of a manifest in one report, before training: a UserError (fix them), or with `skip_bad_files`
    a warning and the rows without them. `problems`: (row, reason), from any check (audio, saved mels).

    More than REPORT_LINES rows: the message shows the first ones and names a file holding them all,
    `<report_dir>/bad_rows_<manifest stem>.txt` (report_dir: the run folder; without one, a temporary file).
    """
    if not problems:
        return rows
    reasons: dict[int, list[str]] = {}
    for row, reason in problems:
        reasons.setdefault(id(row), []).append(reason)
    bad = [row for row in rows if id(row) in reasons]
    lines = [f"line {row.line}: {row.audio_path}: {'; '.join(reasons[id(row)])}" for row in bad]
    kept = [row for row in rows if id(row) not in reasons]
    if skip_bad_files:
        header = f"--skip_bad_files: dropped {len(bad)} bad rows of {manifest}, kept {len(kept)}"
    else:
        header = f"{len(bad)} bad rows in {manifest} (fix them, or pass --skip_bad_files to drop them)"
    shown = lines
    if len(lines) > REPORT_LINES:
        path = _write_report(header, lines, manifest, report_dir)
        shown = [*lines[:REPORT_LINES], f"... and {len(lines) - REPORT_LINES} more: all {len(lines)} in {path}"]
    report = f"{header}:\n  " + "\n  ".join(shown)
    if not skip_bad_files:
        raise UserError(report)
    warnings.warn(report, stacklevel=3)
    if not kept:
        raise UserError(f"no usable rows left in {manifest}")
    return kept


def _write_report(header: str, lines: list[str], manifest: str | os.PathLike, report_dir) -> Path:
    text = f"{header}:\n" + "\n".join(lines) + "\n"
    name = f"bad_rows_{Path(manifest).stem}"
    if report_dir is None:
        handle, path = tempfile.mkstemp(prefix=f"{name}_", suffix=".txt")
        with os.fdopen(handle, "w") as file:
            file.write(text)
        return Path(path)
    path = Path(report_dir) / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # every process of a run writes the same list
    partial.write_text(text)
    os.replace(partial, path)
    return path


class MelDataset(Dataset):
    """Items are (mel [num_mels, frames], audio [samples], loss_mel [num_mels, frames]).

    train=True: random windows of `segment_size` samples (`segment_size // hop` frames); a clip shorter
    than that is zero-padded, not dropped. Pretraining crops at any sample (the mel is taken from the crop);
    with saved mels the crop starts on a frame boundary. train=False: whole utterances (trimmed to a whole
    number of hops), for validation. Clips at another sample rate are resampled once into `resample_cache`.
    Bad rows (audio, and the saved mels) are all reported at once, before training (`drop_bad_rows`); a long list
    goes in full to a file in `report_dir` (the run folder).
    """

    def __init__(self, manifest: str | os.PathLike, config: HifiGanConfig, segment_size: int = 8192,
                 train: bool = True, saved_mels_dir: str | os.PathLike | None = None, seed: int = 0,
                 skip_bad_files: bool = False, resample_cache: str | os.PathLike | None = None,
                 report_dir: str | os.PathLike | None = None):
        if segment_size % config.hop_size != 0:
            raise UserError(f"--segment_size {segment_size} must be a multiple of --hop_size {config.hop_size}")
        self.rows = read_manifest(manifest, check_files=False)
        self.manifest = manifest
        self.config = config
        self.segment_size = segment_size
        self.train = train
        self.saved_mels_dir = Path(saved_mels_dir) if saved_mels_dir is not None else None
        self.seed = seed
        # Pretraining: the vocoder's own mel settings (the official recipe peak-normalises each clip to 0.95).
        self.audio_peak, self.frame_shift = config.mel.audio_peak, 0
        if self.saved_mels_dir is not None:
            info = read_saved_mels_info(self.saved_mels_dir)
            self._check_mel_settings(info.get("mel") or {})
            # Target audio at the level and frame offset of the Tacotron2 that made the mels (see module docstring).
            self.audio_peak, self.frame_shift = info["audio_peak"], int(info["frame_shift"])
        problems = check_audio_files(self.rows, min_seconds=config.hop_size / config.sampling_rate)
        if self.saved_mels_dir is not None:
            problems += self._check_saved_mels({id(row) for row, _ in problems})
        self.rows = drop_bad_rows(self.rows, problems, manifest, skip_bad_files, report_dir)
        # Clips at another rate: resampled once into the cache (train.py: <working_directory>/resampled/<rate>),
        # or, without a cache, on every read.
        self.audio_paths = ([row.audio_path for row in self.rows] if resample_cache is None
                            else resample_once(self.rows, config.sampling_rate, resample_cache))
        # Shared memory, so that persistent DataLoader workers (which keep their own copy of the
        # dataset) see the epoch the main process sets.
        self._epoch = multiprocessing.Value("i", 0, lock=False)
        # Build the mel filter banks now, in the main process: DataLoader workers forked later
        # inherit the cache instead of each paying librosa's numba compilation.
        mel_spectrogram(torch.zeros(config.n_fft), **config.mel_kwargs())
        mel_spectrogram(torch.zeros(config.n_fft), **config.mel_kwargs(for_loss=True))

    def select(self, indices: list[int]) -> None:
        """Keep these clips, in this order (train.py: validation clips spread over the speakers)."""
        self.rows = [self.rows[i] for i in indices]
        self.audio_paths = [self.audio_paths[i] for i in indices]

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

    def _check_mel_settings(self, saved: dict) -> None:
        """The saved mels must be the mel this vocoder reads (the scale included: save_taco_mels converts it)."""
        ours = self.config.mel_kwargs()
        ignored = ("min_db", "max_scaled_abs") if ours["mel_scale"] == "log" else ()  # the dB map's parameters
        changed = [f"{key} {value} (the vocoder's: {ours[key]})" for key, value in saved.items()
                   if key in ours and key not in ignored and value != ours[key]]
        if changed:
            raise UserError(f"the mels in {self.saved_mels_dir} were made with {', '.join(changed)}; re-run "
                            "save_taco_mels.py with the vocoder's mel flags, or train with the mels' settings")

    def _check_saved_mels(self, already_bad: set[int]) -> list[tuple]:
        """At start-up, not mid-epoch: every clip has its .npy, readable, with the vocoder's mel bands, the frame
        count of its audio (±1) and only finite values. Returns a (row, reason) problem for each clip that does not,
        reported with the manifest's other bad rows."""
        problems = []
        rows = [row for row in self.rows if id(row) not in already_bad]
        for row in tqdm(rows, desc=f"checking the mels in {self.saved_mels_dir}", unit="mel", leave=False,
                        disable=len(rows) < 1000):
            path = self.saved_mels_dir / (Path(row.audio_path).stem + ".npy")
            if not path.is_file():
                problems.append((row, f"no {path.name} in {self.saved_mels_dir}; run save_taco_mels.py on this "
                                      "manifest"))
                continue
            try:
                mel = np.load(path, allow_pickle=False)
            except Exception as error:  # numpy raises ValueError, EOFError, OSError, UnpicklingError...
                problems.append((row, f"{path.name} is not a readable .npy ({str(error).splitlines()[0][:80]})"))
                continue
            info = sf.info(row.audio_path)
            frames = round(info.frames * self.config.sampling_rate / info.samplerate) // self.config.hop_size
            if mel.ndim != 2 or mel.shape[0] != self.config.num_mels or abs(mel.shape[1] - frames) > 1:
                problems.append((row, f"{path.name} is {tuple(mel.shape)}, not [{self.config.num_mels} mels, "
                                      f"{frames}±1 frames]; re-run save_taco_mels.py with the vocoder's mel settings"))
            elif not np.isfinite(mel).all():
                # A NaN here would surface only as skipped steps hours later, when its crop comes up.
                problems.append((row, f"{path.name} has {int((~np.isfinite(mel)).sum())} NaN/inf values; "
                                      "re-run save_taco_mels.py --overwrite"))
        return problems

    def _mel(self, audio: torch.Tensor, for_loss: bool = False) -> torch.Tensor:
        return mel_spectrogram(audio, **self.config.mel_kwargs(for_loss=for_loss))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hop = self.config.hop_size
        audio = torch.from_numpy(load_audio(self.audio_paths[index], self.config.sampling_rate, self.audio_peak))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.saved_mels_dir is None:
            if self.train:
                if len(audio) >= self.segment_size:
                    # Any sample, as the official recipe: the mel is computed from the crop itself.
                    start = int(rng.integers(0, len(audio) - self.segment_size + 1))
                    audio = audio[start:start + self.segment_size]
                else:
                    audio = torch.nn.functional.pad(audio, (0, self.segment_size - len(audio)))
            else:
                # Whole hops only; a clip shorter than one hop keeps one (zero-padded) frame.
                audio = torch.nn.functional.pad(audio, (0, max(hop - len(audio), 0)))[:max(len(audio) // hop, 1) * hop]
            return self._mel(audio), audio, self._mel(audio, for_loss=True)

        saved_mel = torch.from_numpy(np.load(self.mel_path(index)).astype(np.float32))
        # Delay the audio by the frame shift, so that frame i's samples are audio[i*hop:(i+1)*hop] (the vocoder's).
        audio = torch.nn.functional.pad(audio, (self.frame_shift, 0))
        # Teacher-forced mels may be a frame off the audio; keep the part both cover.
        frames = min(saved_mel.shape[1], len(audio) // hop)
        saved_mel, audio = saved_mel[:, :frames], audio[:frames * hop]
        if self.train:
            segment_frames = self.segment_size // hop
            if frames >= segment_frames:
                start = int(rng.integers(0, frames - segment_frames + 1))
                saved_mel = saved_mel[:, start:start + segment_frames]
                audio = audio[start * hop:(start + segment_frames) * hop]
            else:
                saved_mel = torch.nn.functional.pad(saved_mel, (0, segment_frames - frames),
                                                    value=float(saved_mel.min()) if saved_mel.numel() else -11.5)
                audio = torch.nn.functional.pad(audio, (0, self.segment_size - len(audio)))
        return saved_mel, audio, self._mel(audio, for_loss=True)
