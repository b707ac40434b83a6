"""Shared helpers: the one mel spectrogram of the repo and its settings, audio and manifest I/O, user-facing errors
and the command-line convention of the scripts (`run_cli`, `pick_device`).

Every mel in the repo (dataset inputs, the mel loss, Tacotron2 targets, teacher-forced mels, inference from wav,
evaluation) comes from `mel_spectrogram` below, with the settings of a `MelConfig`; docs/design.md describes the
convention.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import dataclasses
import functools
import itertools
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F


class UserError(Exception):
    """A problem with the user's input (a file, a flag). Entry points print its one-line message and exit 1."""


def show_warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for scripts: `warning: <message>`, without the file, line and source the default prints;
    through tqdm, so that it lands on its own line above a progress bar."""
    from tqdm.auto import tqdm
    tqdm.write(f"warning: {message}", file=sys.stderr if file is None else file)


def run_cli(main: Callable[[], object]) -> NoReturn:
    """Every script ends in `run_cli(main)`, its `main(argv=None)` raising a UserError for what the user must fix:
    warnings in one line each, and a UserError ends the script with its message and exit status 1, not a traceback.
    An int that main returns is the exit status; anything else is 0."""
    with warnings.catch_warnings():  # (restored on the way out, for callers that run a main in-process)
        warnings.showwarning = show_warning_line
        try:
            result = main()
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


def pick_device(choice: str = "auto") -> torch.device:
    """A `--device auto|cpu|cuda[:N]` choice as a torch.device: auto is CUDA when torch sees a GPU, else the CPU;
    an explicit CUDA device that torch cannot see is a UserError, at start-up rather than at the first tensor."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {choice}, but torch sees no CUDA device; use --device cpu or auto")
    return device


# ---------------------------------------------------------------------------------------------
# Mel spectrogram
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def mel_filter_bank(sampling_rate: int, n_fft: int, num_mels: int, fmin: float, fmax: float | None,
               device: torch.device) -> torch.Tensor:
    # librosa is imported lazily: its first filter-bank call compiles numba code (10-16 s), and
    # lru_cache makes sure that happens once per process and parameter set, not once per step.
    import librosa
    basis = librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=num_mels, fmin=fmin, fmax=fmax)
    return torch.from_numpy(basis).float().to(device)


@functools.lru_cache(maxsize=32)
def _hann_window(window_size: int, device: torch.device) -> torch.Tensor:
    return torch.hann_window(window_size, device=device)


def mel_spectrogram(audio: torch.Tensor, *, sampling_rate: int, n_fft: int, num_mels: int, hop_size: int,
                    window_size: int, fmin: float, fmax: float | None, mel_scale: str = "log",
                    min_db: float = -100.0, max_scaled_abs: float = 4.0, center: bool = False) -> torch.Tensor:
    """Mel spectrogram of `audio` ([T] or [B, T], float in [-1, 1]) -> [num_mels, T // hop_size] (or batched).

    mel_scale="log": natural log of the magnitude mel, clamped at 1e-5 (official HiFi-GAN / NVIDIA
    Tacotron2 convention, so public weights work). mel_scale="db": 20*log10, mapped by the affine map that
    takes [min_db, 0] dB to [-max_scaled_abs, max_scaled_abs] (the seed tutorial's Tacotron2 mel), floored
    at min_db like the log mel's clamp but with no ceiling: loud LJSpeech frames reach +18 dB, and clipping
    them at 0 dB (as the tutorial did) would flatten exactly the loudest speech.

    center=False (the vocoder's frames): reflect-pad (n_fft - hop) / 2 samples, T // hop frames, frame i
    centred on sample i*hop + hop/2, i.e. on the middle of the hop_size samples the generator makes from it.
    center=True (NVIDIA Tacotron2's frames): reflect-pad n_fft / 2, T // hop + 1 frames, frame i centred on
    sample i*hop -- half a hop earlier. The two agree frame for frame once the audio is shifted by hop / 2.
    """
    if mel_scale not in ("log", "db"):
        raise ValueError(f"mel_scale must be 'log' or 'db', got {mel_scale!r}")
    squeeze = audio.dim() == 1
    if squeeze:
        audio = audio.unsqueeze(0)
    audio = audio.float()
    # Pad by (n_fft - hop) / 2 on both sides with center=False: frame i then covers the samples
    # around [i*hop, (i+1)*hop), and there are exactly len // hop frames -- the alignment that
    # lets a vocoder map each frame to hop_size output samples.
    pad = n_fft // 2 if center else (n_fft - hop_size) // 2
    # Reflect padding needs more samples than the pad; a clip that short gets zeros instead.
    mode = "reflect" if audio.shape[-1] > pad else "constant"
    audio = F.pad(audio.unsqueeze(1), (pad, pad), mode=mode).squeeze(1)
    if audio.shape[-1] < n_fft:
        audio = F.pad(audio, (0, n_fft - audio.shape[-1]))
    spec = torch.stft(audio, n_fft, hop_length=hop_size, win_length=window_size,
                      window=_hann_window(window_size, audio.device), center=False,
                      normalized=False, onesided=True, return_complex=True)
    # sqrt(re^2 + im^2 + 1e-9) rather than abs(): the epsilon keeps the gradient finite at zero.
    magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    mel = torch.matmul(mel_filter_bank(sampling_rate, n_fft, num_mels, float(fmin),
                                  None if fmax is None else float(fmax), audio.device), magnitude)
    if mel_scale == "log":
        mel = torch.log(torch.clamp(mel, min=1e-5))
    else:
        mel = log_mel_to_db_mel(torch.log(torch.clamp(mel, min=10.0 ** (min_db / 20.0))), min_db, max_scaled_abs)
    return mel.squeeze(0) if squeeze else mel


def log_mel_to_db_mel(mel: torch.Tensor, min_db: float = -100.0, max_scaled_abs: float = 4.0) -> torch.Tensor:
    """A natural-log mel on the normalised-dB scale: min_db dB -> -max_scaled_abs, 0 dB -> +max_scaled_abs.

    The one conversion between the two scales (they are affine images of each other). Values below min_db
    are floored at -max_scaled_abs; nothing is clipped at the top, so the map is exact above the floor.
    """
    db = 20.0 / math.log(10.0) * mel
    return torch.clamp((2.0 * (db - min_db) / -min_db - 1.0) * max_scaled_abs, min=-max_scaled_abs)


def db_mel_to_log_mel(mel: torch.Tensor, min_db: float = -100.0, max_scaled_abs: float = 4.0) -> torch.Tensor:
    """Inverse of `log_mel_to_db_mel` (exact above the min_db floor)."""
    db = (mel / max_scaled_abs + 1.0) / 2.0 * -min_db + min_db
    return db * math.log(10.0) / 20.0


# ---------------------------------------------------------------------------------------------
# Flags from config dataclasses
# ---------------------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    """'8 8 2 2' arrives as four tokens; '8,8,2,2' or '(8,8,2,2)' as one. Accept all."""
    return [int(v) for v in text.replace("(", " ").replace(")", " ").replace("[", " ").replace("]", " ")
            .replace(",", " ").split()]


def nested_int_tuple(text: str) -> tuple[tuple[int, ...], ...]:
    """Parse '((1,3,5),(1,3,5),(1,3,5))' with ast.literal_eval (never eval: a flag must not run code)."""
    try:
        value = ast.literal_eval(text)
        return tuple(tuple(int(d) for d in group) for group in value)
    except (ValueError, SyntaxError, TypeError):
        raise argparse.ArgumentTypeError(
            f"expected nested integer tuples like '((1,3,5),(1,3,5))', got {text!r}") from None


def float_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


# How each field type of a config dataclass is read from the command line.
_FLAG_TYPES = {"int": {"type": int}, "float": {"type": float}, "str": {"type": str},
               "float | None": {"type": float_or_none}, "bool": {"action": argparse.BooleanOptionalAction},
               "tuple[int, ...]": {"type": int_list, "nargs": "+"},
               "tuple[tuple[int, ...], ...]": {"type": nested_int_tuple}}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default said once: "(default: X)" after the help of every flag that has one, unless
    its help already speaks of its default (or it has none: None, or a switch that is off)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._shows_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default
        return (default is not None and default is not False and default != argparse.SUPPRESS
                and bool(action.option_strings)
                and not isinstance(action, argparse._HelpAction | argparse._VersionAction))

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if self._shows_default(action) and "default" not in help_text.lower():
            help_text += " (default: %(default)s)"
        return help_text


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, title: str,
                     defaults: object | None = None, skip: tuple[str, ...] = ()) -> None:
    """A `--<field>` flag for every field of a config dataclass: the flags and the config cannot drift apart.

    With `defaults` (an instance) a flag defaults to its value; without, to None, meaning "not given" (the caller
    fills in a preset or a checkpoint's value, see `config_overrides`). Help and choices come from field metadata.
    """
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        kind = _FLAG_TYPES[str(field.type)]
        default = None if defaults is None else getattr(defaults, field.name)
        group.add_argument(f"--{field.name}", default=default, choices=field.metadata.get("choices"),
                           help=field.metadata.get("help"), **kind)


def config_overrides(args: argparse.Namespace, config_class: type, skip: tuple[str, ...] = ()) -> dict:
    """The fields of `config_class` given on the command line (not None), as config values."""
    values = {}
    for field in dataclasses.fields(config_class):
        value = None if field.name in skip else getattr(args, field.name, None)
        if value is None:
            continue
        if str(field.type) == "tuple[int, ...]":  # nargs="+" of int_lists -> one flat tuple
            value = tuple(itertools.chain.from_iterable(value))
        values[field.name] = value
    return values


# ---------------------------------------------------------------------------------------------
# Mel settings
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MelConfig:
    """Every setting that turns a recording into a mel: the STFT and filter bank, the scale, the frames, the level.

    The vocoder stores these (flat) in its config.json, a Tacotron2 under "audio" in its own; every script reads
    them from there. The defaults are the official HiFi-GAN's; `MelConfig.nvidia()` is NVIDIA Tacotron2's.
    """
    sampling_rate: int = 22050
    num_mels: int = 80
    n_fft: int = 1024
    window_size: int = 1024
    hop_size: int = 256
    fmin: float = 0.0
    fmax: float | None = 8000.0
    mel_scale: str = dataclasses.field(default="log", metadata={
        "choices": ["log", "db"], "help": "log: natural log (HiFi-GAN's, NVIDIA's); db: the seed tutorial's scale"})
    min_db: float = dataclasses.field(default=-100.0, metadata={"help": "db scale: the floor, mapped to "
                                                                "-max_scaled_abs"})
    max_scaled_abs: float = dataclasses.field(default=4.0, metadata={"help": "db scale: 0 dB maps to this"})
    center: bool = dataclasses.field(default=False, metadata={"help": "NVIDIA's centred STFT frames"})
    # None: the level as recorded (NVIDIA's Tacotron2 was trained so).
    audio_peak: float | None = dataclasses.field(default=0.95, metadata={
        "help": "peak-normalise each clip to this before its mel (official HiFi-GAN: 0.95); 'none': as recorded"})

    @classmethod
    def nvidia(cls) -> MelConfig:
        """NVIDIA's published Tacotron2 (its hparams.py, TacotronSTFT and TextMelLoader); its file stores none of it."""
        return cls(center=True, audio_peak=None)

    @classmethod
    def from_dict(cls, values: dict) -> MelConfig:
        """From a config.json's entries; keys that are not mel settings are ignored, missing ones keep the defaults."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known}).checked()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def kwargs(self) -> dict:
        """`mel_spectrogram`'s keyword arguments (all but the level, which is the audio's business)."""
        values = self.to_dict()
        del values["audio_peak"]
        return values

    def mel(self, audio: torch.Tensor) -> torch.Tensor:
        return mel_spectrogram(audio, **self.kwargs())

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """A recording at this sample rate and level."""
        return load_audio(path, self.sampling_rate, peak=self.audio_peak)

    @property
    def frame_shift(self) -> int:
        """Samples by which mel frame i's audio starts before i*hop: hop/2 for centred frames, else 0."""
        return self.hop_size // 2 if self.center else 0

    def convert(self, mel: torch.Tensor, target: MelConfig) -> torch.Tensor:
        """A mel on this scale re-expressed on `target`'s (log or dB): the repo's one conversion between them."""
        if self.mel_scale == "db":
            mel = db_mel_to_log_mel(mel, self.min_db, self.max_scaled_abs)
        if target.mel_scale == "db":
            mel = log_mel_to_db_mel(mel, target.min_db, target.max_scaled_abs)
        return mel

    def differences(self, other: MelConfig, names: tuple[str, ...] = ("sampling_rate", "num_mels", "n_fft",
                    "window_size", "hop_size", "fmin", "fmax")) -> list[str]:
        """'name this (other)' for each of `names` that differs: by default what must agree for one model's mel to
        feed another (the scale is converted, the frames and level are followed)."""
        return [f"{name} {getattr(self, name)} ({getattr(other, name)})" for name in names
                if getattr(self, name) != getattr(other, name)]

    def checked(self) -> MelConfig:
        """Itself, or a UserError naming the setting that cannot work and the fix."""
        if self.mel_scale not in ("log", "db"):
            raise UserError(f"mel_scale {self.mel_scale!r}: choose log or db")
        if self.fmax is not None and self.fmax > self.sampling_rate / 2:
            raise UserError(f"fmax {self.fmax} is above the Nyquist frequency of {self.sampling_rate} Hz audio "
                            f"({self.sampling_rate / 2:g}); lower --fmax")
        if not 0 <= self.fmin < (self.fmax or self.sampling_rate / 2):
            raise UserError(f"fmin {self.fmin} must be at least 0 and below fmax {self.fmax}")
        if self.window_size > self.n_fft:
            raise UserError(f"window_size {self.window_size} is longer than n_fft {self.n_fft}; raise --n_fft")
        if not 0 < self.hop_size <= self.window_size:
            raise UserError(f"hop_size {self.hop_size} must be positive and at most window_size {self.window_size}")
        if self.audio_peak is not None and not 0 < self.audio_peak <= 1:
            raise UserError(f"audio_peak {self.audio_peak} must be in (0, 1], or None for the recorded level")
        return self


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------

_warned_resample: set[tuple[int, int]] = set()


def load_audio(path: str | os.PathLike, sampling_rate: int, peak: float | None = 0.95) -> np.ndarray:
    """Read a clip as float32 mono in [-1, 1] at `sampling_rate`, peak-normalised to `peak` (None: as is).

    soundfile scales integer PCM to [-1, 1]; several channels are averaged; another sample rate is
    resampled (said once per rate pair). Raises UserError naming the file when it cannot be read.
    """
    try:
        audio, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types for missing/corrupt files
        raise UserError(f"cannot read audio file {path}: {error}. Check the path, or convert it to wav/flac.") from None
    # Before resampling: librosa refuses non-finite input.
    audio = np.nan_to_num(audio.mean(axis=1), nan=0.0, posinf=0.0, neginf=0.0)
    if file_rate != sampling_rate:
        if (file_rate, sampling_rate) not in _warned_resample:
            _warned_resample.add((file_rate, sampling_rate))
            warnings.warn(f"{path} is at {file_rate} Hz; resampling to {sampling_rate} Hz "
                          f"(said once for every {file_rate} Hz file)", stacklevel=2)
        import librosa
        audio = librosa.resample(audio, orig_sr=file_rate, target_sr=sampling_rate).astype(np.float32)
    if peak is not None:
        # Normalise by the *absolute* maximum: a clip whose loudest sample is negative must not be
        # scaled past full scale (the seed normalised by max(), which lets -1.3 through).
        max_abs = float(np.abs(audio).max()) if audio.size else 0.0
        if max_abs > 0:
            audio = audio * (peak / max_abs)
    return audio.astype(np.float32)


def save_audio(path: str | os.PathLike, audio: np.ndarray | torch.Tensor, sampling_rate: int) -> None:
    """Write float audio as 16-bit PCM wav (soundfile clips to [-1, 1], so a full-scale peak cannot wrap)."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().float().cpu().numpy()
    audio = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, sampling_rate, subtype="PCM_16")


# ---------------------------------------------------------------------------------------------
# Manifests (docs/design.md §2)
# ---------------------------------------------------------------------------------------------

@dataclass
class ManifestRow:
    audio_path: str
    transcript: str | None
    line: int  # 1-based line in the manifest, for error messages
    speaker: str | None = None  # the manifest's optional `speaker` column


def interleave_speakers(rows: list[ManifestRow]) -> list[int]:
    """Indices of `rows` taking each speaker's clips in turn (every speaker's first clip, then every second, ...),
    each speaker's in manifest order: any prefix covers as many speakers as it can. One speaker: the manifest order."""
    by_speaker: dict[str | None, list[int]] = {}
    for index, row in enumerate(rows):
        by_speaker.setdefault(row.speaker, []).append(index)
    return [index for group in itertools.zip_longest(*by_speaker.values()) for index in group if index is not None]


def read_manifest(path: str | os.PathLike, check_files: bool = True) -> list[ManifestRow]:
    """Rows of a manifest: a CSV with a `file_path` header (prep_splits.py; optional `normalized_transcript` and
    `speaker` columns) or LJSpeech's metadata.csv.

    Relative paths resolve against the manifest's folder. With check_files, a missing audio file is
    reported at once, naming the row, the file and the manifest.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist; create it with prep_splits.py or pass the right path")
    folder = path.parent
    # utf-8-sig drops the BOM a spreadsheet writes first; CRLF line ends are stripped below and by csv.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        first = handle.readline()
        handle.seek(0)
        rows = []
        if "file_path" in [column.strip() for column in next(csv.reader([first]), [])]:
            reader = csv.DictReader(handle)
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            for line, record in enumerate(reader, start=2):
                file_path = (record.get("file_path") or "").strip()
                if not file_path:
                    raise UserError(f"{path}, line {line}: empty file_path; fix or remove the row")
                transcript = record.get("normalized_transcript") or record.get("transcript")
                speaker = (record.get("speaker") or "").strip() or None
                rows.append(ManifestRow(str(folder / file_path), transcript, line, speaker))
        elif "|" in first:
            # LJSpeech metadata.csv: id|transcript|normalized transcript, audio in wavs/<id>.wav.
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                fields = text.rstrip("\r\n").split("|")
                transcript = fields[2] if len(fields) > 2 and fields[2] else (fields[1] if len(fields) > 1 else None)
                rows.append(ManifestRow(str(folder / "wavs" / f"{fields[0]}.wav"), transcript, line))
        else:
            raise UserError(f"{path}: not a manifest (expected a CSV header with 'file_path', "
                            "or LJSpeech's 'id|transcript|normalized transcript' lines)")
    if not rows:
        raise UserError(f"manifest {path} has no rows")
    if check_files:
        for row in rows:
            if not os.path.isfile(row.audio_path):
                raise UserError(f"{path}, line {row.line}: audio file {row.audio_path} does not exist; "
                                "fix the path or remove the row")
    return rows


def write_manifest(path: str | os.PathLike, rows: Iterable[ManifestRow], *, relative: bool = False,
                   speakers: bool = True) -> None:
    """Write `rows` as the CSV `read_manifest` reads: `file_path,normalized_transcript,speaker` (without the speaker
    column when not `speakers`), file paths absolute or, with `relative`, relative to the manifest's folder (a corpus
    that can move). Written under a temporary name and renamed: a run killed half-way leaves no manifest, so the
    next run does not mistake a partial one for a complete one."""
    path = Path(path)
    columns = ["file_path", "normalized_transcript", "speaker"][:3 if speakers else 2]
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            file_path = (Path(os.path.relpath(row.audio_path, path.parent)).as_posix() if relative
                         else os.path.abspath(row.audio_path))
            writer.writerow([file_path, row.transcript or "", row.speaker or ""][:len(columns)])
    os.replace(partial, path)


Item = TypeVar("Item")


def unique_stems(items: Iterable[Item], suffix: str, path: Callable[[Item], str | os.PathLike] = lambda item: item,
                 label: Callable[[Item], str] = str, same_file_once: bool = False) -> list[Item]:
    """`items` (paths, or anything `path` maps to one) whose outputs are named `<file stem><suffix>` in one folder,
    checked that no two of them would get the same name: a UserError names both ("<label> and <label> would both be
    saved as <stem><suffix>; rename one"). With `same_file_once`, an item whose file an earlier item already names
    (one clip listed in two manifests) is dropped instead."""
    kept: list[Item] = []
    first: dict[str, Item] = {}
    for item in items:
        stem = Path(path(item)).stem
        if stem in first:
            if same_file_once and Path(path(first[stem])).resolve() == Path(path(item)).resolve():
                continue
            raise UserError(f"{label(first[stem])} and {label(item)} would both be saved as {stem}{suffix}; "
                            "rename one")
        first[stem] = item
        kept.append(item)
    return kept


def check_audio_files(rows: list[ManifestRow], min_seconds: float = 0.0) -> list[tuple[ManifestRow, str]]:
    """Cheap start-up checks of every row (exists, header readable, not empty, long enough), without decoding.

    Returns (row, reason) for each bad row, so a run can refuse to start (or drop them) instead of
    failing hours later on the file.
    """
    problems = []
    for row in rows:
        reason = None
        if not os.path.isfile(row.audio_path):
            reason = "file does not exist"
        else:
            try:
                info = sf.info(row.audio_path)
            except Exception as error:  # soundfile raises several types for corrupt headers
                reason = f"unreadable ({str(error).splitlines()[0][:80]})"
            else:
                if info.frames == 0 or info.channels == 0:
                    reason = "no audio samples"
                elif info.frames / info.samplerate < min_seconds:
                    reason = f"{info.frames / info.samplerate:.4f} s long, shorter than {min_seconds:.4f} s"
        if reason:
            problems.append((row, reason))
    return problems
