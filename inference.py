"""Mel -> waveform with a trained HiFi-GAN generator (or the Griffin-Lim baseline), from every way in.

    python inference.py --checkpoint work_dir/hifigan --input mels/ --output_dir out/          # .npy mels
    python inference.py --checkpoint generator_v1 --input clip.wav metadata.csv --output_dir out/  # copy-synthesis
    python inference.py --checkpoint generator_v1 --taco_weights tacotron2_statedict.pt \\
        --text "Printing, in the only sense with which we are at present concerned." --output_dir out/
    python inference.py --vocoder griffin_lim --config v1 --input clip.wav --output_dir out/   # the baseline
    python inference.py --checkpoint work_dir/hifigan --export_onnx hifigan.onnx              # for ONNX Runtime

`--checkpoint` takes this repo's export (a folder with generator.safetensors + config.json: a run folder or a
checkpoint_<step> folder) or an official jik876 generator file (generator_v1, g_02500000, ...). Every input
becomes `<output_dir>/<stem>.wav` (text: text_000.wav, ...), 16-bit at the model's sample rate.
The functions below (load_vocoder, vocode, vocode_batch, griffin_lim, text_to_mel, mel_from_wav; export_onnx,
onnx_session, vocode_onnx) are what evaluate.py, bench.py and the notebook import.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from model import Generator, HifiGanConfig, load_generator, resolve_config
from tacotron2 import Tacotron2, load_tacotron2, text_to_sequence
from tacotron2.teacher_forcing import mel_settings
from utils import (
    UserError,
    _mel_basis,
    db_mel_to_log_mel,
    load_audio,
    log_mel_to_db_mel,
    mel_spectrogram,
    read_manifest,
    save_audio,
)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Vocoding
# ---------------------------------------------------------------------------------------------

def load_vocoder(checkpoint: str | os.PathLike, config: str | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Generator:
    """A generator ready for inference: weight norm folded (one conv per layer, not three ops), eval mode."""
    generator = load_generator(checkpoint, config=config, device="cpu")
    return generator.remove_weight_norm().to(device=device, dtype=dtype).eval()


def _hop(generator: Generator) -> int:
    # The generator's own upsampling factor, which is what one mel frame becomes.
    return math.prod(generator.config.upsample_rates)


def _silence(config: HifiGanConfig) -> float:
    """The mel value of digital silence: the clamp floor of the mel scale (log(1e-5), or -max_scaled_abs in dB)."""
    return math.log(1e-5) if config.mel_scale == "log" else -config.max_scaled_abs


def _check_mel(generator: Generator, mel: torch.Tensor) -> torch.Tensor:
    if mel.dim() == 3 and mel.size(0) == 1:
        mel = mel[0]
    if mel.dim() != 2 or mel.size(0) != generator.config.num_mels or mel.size(1) == 0:
        raise UserError(f"mel must be [num_mels={generator.config.num_mels}, frames > 0], got {list(mel.shape)}")
    return mel


def _run(generator: Generator, mels: torch.Tensor) -> torch.Tensor:
    """[B, num_mels, frames] -> float32 CPU audio [B, frames * hop], computed in the generator's device and dtype."""
    weight = next(generator.parameters())
    audio = generator(mels.to(device=weight.device, dtype=weight.dtype))
    return audio[:, 0].float().cpu()


def vocode(generator: Generator, mel: torch.Tensor, max_chunk_frames: int | None = None,
           overlap_frames: int = 16) -> torch.Tensor:
    """Mel [num_mels, frames] -> float32 CPU audio [frames * hop].

    With `max_chunk_frames`, a longer mel is vocoded in chunks of that many frames, each computed with
    `overlap_frames` of real context on both sides, so memory stays bounded on hour-long inputs. The
    generator's receptive field is finite (about ±13 frames for V1/V2, ±10 for V3), so with the default
    16 frames of context each chunk equals the whole-utterance output over its own frames; a short
    raised-cosine crossfade (overlap_frames / 4 frames) centred on each join hides whatever difference
    remains when less context is given.
    """
    mel = _check_mel(generator, mel)
    if max_chunk_frames is not None and max_chunk_frames < max(1, overlap_frames):
        raise UserError(f"max_chunk_frames ({max_chunk_frames}) must be at least overlap_frames ({overlap_frames})")
    # Cloned outside inference mode: callers may edit the audio in place (torch forbids it on inference tensors).
    return _vocode(generator, mel, max_chunk_frames, overlap_frames).clone()


@torch.inference_mode()
def _vocode(generator: Generator, mel: torch.Tensor, max_chunk_frames: int | None, overlap_frames: int
            ) -> torch.Tensor:
    frames, hop = mel.size(1), _hop(generator)
    if max_chunk_frames is None or frames <= max_chunk_frames:
        return _run(generator, mel[None])[0]
    fade = (overlap_frames // 4) * hop
    audio = torch.zeros(frames * hop)
    for start in range(0, frames, max_chunk_frames):
        end = min(start + max_chunk_frames, frames)
        first, last = max(0, start - overlap_frames), min(frames, end + overlap_frames)
        chunk = _run(generator, mel[None, :, first:last])[0]
        # This chunk's share: 1 over its own frames, ramping across the fade centred on each join.
        low = 0 if start == 0 else start * hop - fade // 2
        high = frames * hop if end == frames else min(frames * hop, end * hop + fade // 2)
        positions = torch.arange(low, high, dtype=torch.float64) + 0.5
        weight = torch.ones(high - low, dtype=torch.float64)
        if fade and start > 0:
            weight *= _raised_cosine((positions - (start * hop - fade // 2)) / fade)
        if fade and end < frames:
            weight *= 1 - _raised_cosine((positions - (end * hop - fade // 2)) / fade)
        audio[low:high] += (chunk[low - first * hop:high - first * hop] * weight).float()
    return audio


def _raised_cosine(u: torch.Tensor) -> torch.Tensor:
    """0 -> 1 over u in [0, 1] (clamped outside); w(u) + w(1 - u) = 1, so complementary fades sum to one."""
    return 0.5 - 0.5 * torch.cos(math.pi * u.clamp(0, 1))


def vocode_batch(generator: Generator, mels: list[torch.Tensor], max_chunk_frames: int | None = None,
                 batch_size: int = 8) -> list[torch.Tensor]:
    """Vocode many mels; returns float32 CPU audio [frames * hop] for each, in the input order.

    Mels are sorted by length and vocoded `batch_size` at a time, padded with silence to the longest of
    their batch (sorting keeps that padding small); a mel longer than `max_chunk_frames` goes alone
    through `vocode`'s chunking. Near its end, a padded mel's audio differs slightly from vocoding it alone
    (the generator sees silence there instead of its zero padding).
    """
    mels = [_check_mel(generator, mel) for mel in mels]
    hop, silence = _hop(generator), _silence(generator.config)
    outputs: list[torch.Tensor | None] = [None] * len(mels)
    short = []
    for i, mel in enumerate(mels):
        if max_chunk_frames is not None and mel.size(1) > max_chunk_frames:
            outputs[i] = vocode(generator, mel, max_chunk_frames)
        else:
            short.append(i)
    short.sort(key=lambda i: mels[i].size(1))
    with torch.inference_mode():
        for batch_start in range(0, len(short), batch_size):
            indices = short[batch_start:batch_start + batch_size]
            longest = mels[indices[-1]].size(1)
            padded = torch.full((len(indices), mels[indices[0]].size(0), longest), silence)
            for row, i in enumerate(indices):
                padded[row, :, :mels[i].size(1)] = mels[i]
            audio = _run(generator, padded)
            for row, i in enumerate(indices):
                outputs[i] = audio[row, :mels[i].size(1) * hop]
    return [audio.clone() for audio in outputs]  # ordinary tensors, as in vocode


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------

def export_onnx(generator: Generator, path: str | os.PathLike, opset: int | None = None) -> Path:
    """Write the generator, weight norm folded, as a single-file ONNX model: `mel` [B, num_mels, frames] ->
    `audio` [B, 1, frames * hop], batch and frames dynamic. Its config travels in the metadata ("hifigan_config").

    The model is exported from `generator.folded_copy()` (float32, CPU), so `generator` is left as it was,
    weight norm live or folded. The file is written under a temporary name and renamed.
    """
    import importlib.util
    import logging

    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX export needs {' and '.join(missing)}: pip install onnx onnxscript")
    folded = generator.folded_copy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    example = torch.randn(2, generator.config.num_mels, 32)
    # The dynamo exporter (torch.export), not the legacy TorchScript one. On torch 2.13 both give a correct
    # model with dynamic batch and frames (both checked against eager to ~1e-7 at other batch sizes and
    # lengths, down to 1 frame), but the legacy one is deprecated (a DeprecationWarning on every call; the
    # dynamo one is the default since torch 2.9), and only the dynamo one records the output length as
    # frames × hop rather than as an unrelated free dimension. Its costs: 2-7 s per export here (legacy:
    # 0.2 s), and onnx + onnxscript installed.
    torch_onnx_logger = logging.getLogger("torch.onnx")
    level = torch_onnx_logger.level
    torch_onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" ...
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's internal deprecation notices
            program = torch.onnx.export(
                folded, (example,), input_names=["mel"], output_names=["audio"], opset_version=opset, dynamo=True,
                dynamic_shapes={"mel": {0: torch.export.Dim("batch"), 2: torch.export.Dim("frames")}},
                verbose=False)
        program.model.metadata_props["hifigan_config"] = json.dumps(generator.config.to_dict())
        program.save(tmp, external_data=False)  # one file, weights included
        os.replace(tmp, path)
    finally:
        torch_onnx_logger.setLevel(level)
        tmp.unlink(missing_ok=True)
    return path


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime InferenceSession (CPU) of a model written by export_onnx; threads: intra-op threads
    (None: onnxruntime's default, one per core)."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX inference needs onnxruntime: pip install onnxruntime") from None
    if not os.path.isfile(path):
        raise UserError(f"ONNX model {path} does not exist")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    # Its threads would otherwise busy-wait after each run, taking the cores from PyTorch in the same process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own InvalidProtobuf, Fail, ...
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{path} is not a readable ONNX model ({message})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != ["mel"] or [o.name for o in outputs] != ["audio"] or len(inputs[0].shape) != 3:
        raise UserError(f"{path} is an ONNX model but not a HiFi-GAN generator export (inputs "
                        f"{[(i.name, i.shape) for i in inputs]}, outputs {[o.name for o in outputs]}; expected "
                        "mel [batch, num_mels, frames] -> audio); write one with inference.py --export_onnx")
    return session


def vocode_onnx(session, mel: torch.Tensor) -> torch.Tensor:
    """Like vocode, through an onnx_session: mel [num_mels, frames] -> float32 CPU audio [frames * hop];
    a batch [B, num_mels, frames] -> [B, frames * hop]."""
    num_mels = session.get_inputs()[0].shape[1]
    batched = mel.dim() == 3
    mels = mel if batched else mel[None]
    if mels.dim() != 3 or mels.size(1) != num_mels or mels.size(2) == 0:
        raise UserError(f"mel must be [num_mels={num_mels}, frames > 0] or [batch, {num_mels}, frames], "
                        f"got {list(mel.shape)}")
    audio = session.run(["audio"], {"mel": mels.detach().float().cpu().contiguous().numpy()})[0]
    audio = torch.from_numpy(audio)[:, 0]
    return audio if batched else audio[0]


def griffin_lim(mel: torch.Tensor, config: HifiGanConfig, n_iters: int = 60) -> torch.Tensor:
    """The classical baseline from the same mel: mel -> linear magnitude -> fast Griffin-Lim -> audio [frames * hop].

    The magnitude is the pseudo-inverse of the mel filter bank, clamped at 0 (librosa's non-negative least
    squares fit an LJSpeech mel no better and took ~1000x longer). The STFT is DESIGN.md §1's: frame i covers the
    signal reflect-padded by (n_fft - hop) / 2, center=False, so the output lines up sample for sample
    with what HiFi-GAN makes from the same mel. Phase starts random (seeded) and uses momentum 0.99
    (Perraudin et al., 2013; librosa's default).
    """
    mel = mel.detach().float().cpu()
    if mel.dim() != 2 or mel.size(0) != config.num_mels or mel.size(1) == 0:
        raise UserError(f"mel must be [num_mels={config.num_mels}, frames > 0], got {list(mel.shape)}")
    if config.mel_scale == "db":
        mel = db_mel_to_log_mel(mel, config.min_db, config.max_scaled_abs)
    basis = _mel_basis(config.sampling_rate, config.n_fft, config.num_mels, float(config.fmin),
                       None if config.fmax is None else float(config.fmax), torch.device("cpu"))
    magnitude = (torch.linalg.pinv(basis) @ mel.exp()).clamp(min=0)

    n_fft, hop, frames = config.n_fft, config.hop_size, mel.size(1)
    pad = (n_fft - hop) // 2
    length = (frames - 1) * hop + n_fft  # the padded signal whose center=False STFT has `frames` frames
    left = (n_fft - config.window_size) // 2
    window = torch.zeros(n_fft)
    window[left:left + config.window_size] = torch.hann_window(config.window_size)

    def stft(signal: torch.Tensor) -> torch.Tensor:
        return torch.stft(signal, n_fft, hop_length=hop, win_length=config.window_size,
                          window=torch.hann_window(config.window_size), center=False, return_complex=True)

    def overlap_add(columns: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.fold(columns[None], (1, length), (1, n_fft), stride=(1, hop)).reshape(-1)

    # Least-squares inverse STFT by hand: torch.istft(center=False) refuses the Hann window's zero at
    # the very first sample, which here lies in the padding and is cropped anyway.
    envelope = overlap_add(window.pow(2)[:, None].expand(n_fft, frames)).clamp(min=1e-8)

    def istft(spec: torch.Tensor) -> torch.Tensor:
        return overlap_add(torch.fft.irfft(spec, n=n_fft, dim=0) * window[:, None]) / envelope

    generator = torch.Generator().manual_seed(0)
    angles = torch.exp(2j * math.pi * torch.rand(magnitude.shape, generator=generator))
    rebuilt = torch.zeros_like(angles)
    momentum = 0.99
    for _ in range(n_iters):
        previous = rebuilt
        rebuilt = stft(istft(magnitude * angles))
        angles = rebuilt - momentum / (1 + momentum) * previous
        angles = angles / (angles.abs() + 1e-16)
    audio = istft(magnitude * angles)[pad:pad + frames * hop]
    return torch.nn.functional.pad(audio, (0, frames * hop - audio.numel()))


# ---------------------------------------------------------------------------------------------
# Mels from files and text
# ---------------------------------------------------------------------------------------------

def mel_from_wav(path: str | os.PathLike, config: HifiGanConfig) -> torch.Tensor:
    """Copy-synthesis input: the clip at its recorded level -> mel [num_mels, frames].

    Not peak-normalised (as the official inference): the vocoded file then has the level of the recording it
    stands for, and can be compared with it as it is.
    """
    audio = load_audio(path, config.sampling_rate, peak=None)
    if len(audio) < config.hop_size:
        raise UserError(f"{path}: {len(audio)} samples, shorter than one mel frame ({config.hop_size} samples)")
    return mel_spectrogram(torch.from_numpy(audio), **config.mel_kwargs())


def load_mel(path: str | os.PathLike, config: HifiGanConfig, mmap: bool = False) -> np.ndarray:
    """A .npy mel, checked: [num_mels, frames] (a leading batch of 1 is dropped). mmap: read only the header."""
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty (0 bytes); expected a .npy mel [{config.num_mels}, frames]")
    try:
        mel = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError, EOFError, OSError, UnpicklingError...
        raise UserError(f"{path} is not a readable .npy file ({str(error).splitlines()[0]})") from None
    if mel.ndim == 3 and mel.shape[0] == 1:
        mel = mel[0]
    if mel.ndim != 2 or mel.shape[0] != config.num_mels or mel.shape[1] == 0:
        hint = "; it looks transposed ([frames, mels])" if mel.ndim == 2 and mel.shape[1] == config.num_mels else ""
        raise UserError(f"{path} has shape {list(mel.shape)}, but the vocoder expects [{config.num_mels}, frames] "
                        f"({config.num_mels} mel bands){hint}")
    return mel if mmap else mel.astype(np.float32)


def load_tacotron(path: str | os.PathLike, device: str | torch.device = "cpu") -> Tacotron2:
    """tacotron2.load_tacotron2 plus its mel settings (tacotron2.teacher_forcing.mel_settings: NVIDIA's for NVIDIA's
    file, else what its config.json's "audio" records) in `model.audio`, for text_to_mel and teacher forcing."""
    model = load_tacotron2(path).to(device)
    model.audio = mel_settings(path)
    return model


def text_to_mel(tacotron: Tacotron2, text: str, vocoder_config: HifiGanConfig, max_decoder_steps: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Text -> (post-net mel [num_mels, frames] on the vocoder's mel scale, alignment [frames, tokens]).

    The Tacotron2's own mel scale comes from `tacotron.audio` (see load_tacotron; NVIDIA's is "log");
    a dB-trained one is converted, the two scales being affine images of each other.
    """
    tokens = text_to_sequence(text)
    if not tokens:
        raise UserError(f"text {text!r} has no symbols Tacotron2 can speak")
    audio = getattr(tacotron, "audio", None) or {}
    num_mels = tacotron.config.n_mel_channels
    if num_mels != vocoder_config.num_mels:
        raise UserError(f"the Tacotron2 makes {num_mels} mel bands but the vocoder expects {vocoder_config.num_mels}")
    for key in ("sampling_rate", "hop_size"):
        if key in audio and audio[key] != getattr(vocoder_config, key):
            raise UserError(f"the Tacotron2 was trained with {key}={audio[key]} but the vocoder uses "
                            f"{getattr(vocoder_config, key)}; their mels are not interchangeable")
    _, mel, _, alignments = tacotron.infer(tokens, max_decoder_steps=max_decoder_steps)
    mel = mel[0].float().cpu()
    scale = audio.get("mel_scale", "log")
    if scale == "db" and vocoder_config.mel_scale == "log":
        mel = db_mel_to_log_mel(mel, audio.get("min_db", -100.0), audio.get("max_scaled_abs", 4.0))
    elif scale == "log" and vocoder_config.mel_scale == "db":
        mel = log_mel_to_db_mel(mel, vocoder_config.min_db, vocoder_config.max_scaled_abs)
    return mel, alignments[0].float().cpu()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One output file: a mel file, an audio file, or a sentence."""
    name: str
    kind: str  # "npy", "audio" or "text"
    source: str
    frames: int  # an estimate, for grouping similar lengths into a batch


def collect_jobs(args: argparse.Namespace, config: HifiGanConfig) -> list[Job]:
    """Expand --input paths (mels, audio, folders, manifests) or --text/--text_file into checked jobs."""
    if args.text or args.text_file:
        lines = list(args.text or [])
        if args.text_file:
            if not os.path.isfile(args.text_file):
                raise UserError(f"text file {args.text_file} does not exist")
            lines += [line.strip() for line in Path(args.text_file).read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line.strip()]
        if not lines:
            raise UserError("no text to speak: --text/--text_file gave only empty lines")
        return [Job(f"text_{i:03d}", "text", line, len(line)) for i, line in enumerate(lines)]

    paths: list[Path] = []
    for given in args.input:
        path = Path(given)
        if not path.exists():
            raise UserError(f"input {path} does not exist")
        if path.is_dir():
            found = sorted(path.glob("*.npy"))
            found = found or sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise UserError(f"input folder {path} has no .npy mels and no {'/'.join(AUDIO_SUFFIXES)} files")
            paths += found
        elif path.suffix.lower() == ".csv":
            paths += [Path(row.audio_path) for row in read_manifest(path)]
        else:
            paths.append(path)

    jobs, names = [], {}
    for path in paths:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            jobs.append(Job(path.stem, "npy", str(path), load_mel(path, config, mmap=True).shape[1]))
        elif suffix in AUDIO_SUFFIXES:
            if path.stat().st_size == 0:
                raise UserError(f"{path} is empty (0 bytes)")
            try:
                info = sf.info(str(path))
            except Exception as error:
                raise UserError(f"cannot read audio file {path}: {error}") from None
            if info.frames == 0:
                raise UserError(f"{path} is empty (no audio samples)")
            frames = int(info.duration * config.sampling_rate) // config.hop_size
            jobs.append(Job(path.stem, "audio", str(path), frames))
        else:
            raise UserError(f"input {path}: unsupported type {suffix or '(no suffix)'}; give .npy mels, "
                            f"{'/'.join(AUDIO_SUFFIXES)} audio, a folder of them, or a .csv manifest")
        if path.stem in names:
            raise UserError(f"inputs {names[path.stem]} and {path} would both be written as {path.stem}.wav")
        names[path.stem] = path
    return jobs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Vocode mels, audio (copy-synthesis) or text with HiFi-GAN.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", help="generator export folder (generator.safetensors + config.json) "
                                             "or an official jik876 generator file")
    parser.add_argument("--config", help="v1|v2|v3 or a config.json: overrides the checkpoint's (official "
                                         "files carry none); for griffin_lim, the mel parameters (v1 when not given)")
    source = parser.add_mutually_exclusive_group()  # required unless --export_onnx: checked below
    source.add_argument("--input", nargs="+", help=".npy mels, wav files, folders of either, .csv manifests")
    source.add_argument("--text", nargs="+", help="sentences to speak (needs --taco_weights)")
    source.add_argument("--text_file", help="a text file, one sentence per line (needs --taco_weights)")
    parser.add_argument("--taco_weights", help="Tacotron2 checkpoint: NVIDIA's file or a save_tacotron2 folder")
    parser.add_argument("--max_decoder_steps", type=int, help="Tacotron2 decoding limit (default: its config's)")
    parser.add_argument("--output_dir", help="where the wavs go (required unless --export_onnx)")
    parser.add_argument("--vocoder", choices=["hifigan", "griffin_lim"], default="hifigan")
    parser.add_argument("--griffin_lim_iters", type=int, default=60)
    parser.add_argument("--max_chunk_frames", type=int, default=2000,
                        help="vocode longer mels in overlapping chunks of this many frames (bounds memory)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the generator (exact; worth it for "
                        "many or long inputs: the first one waits for the compiler)")
    parser.add_argument("--seed", type=int, default=1234, help="Tacotron2's prenet dropout stays on at inference")
    parser.add_argument("--export_onnx", metavar="PATH", help="write the --checkpoint generator (weight norm folded, "
                        "dynamic batch and frames) as an ONNX model to PATH, check it against PyTorch, and exit")
    parser.add_argument("--onnx_opset", type=int, help="ONNX opset for --export_onnx (default: the exporter's)")
    args = parser.parse_args(argv)
    has_source = bool(args.input or args.text or args.text_file)
    if args.export_onnx:
        if has_source or args.output_dir:
            parser.error("--export_onnx exports and exits: give it --checkpoint (and --config), "
                         "not --input/--text/--text_file/--output_dir")
    elif not has_source:
        parser.error("one of the arguments --input --text --text_file is required")
    elif not args.output_dir:
        parser.error("the following arguments are required: --output_dir")
    return args


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def export(args: argparse.Namespace) -> None:
    """--export_onnx: write the model, then run it and PyTorch on the same random mel and print the difference."""
    if not args.checkpoint:
        raise UserError("--export_onnx needs --checkpoint: the generator to export")
    generator = load_vocoder(args.checkpoint, args.config)
    path = export_onnx(generator, args.export_onnx, args.onnx_opset)
    session = onnx_session(path)
    mel = torch.randn(2, generator.config.num_mels, 37, generator=torch.Generator().manual_seed(0)) + _silence(
        generator.config) / 2  # arbitrary, but with a batch and a length other than the exported example's
    with torch.inference_mode():
        expected = _run(generator, mel)
    difference = (vocode_onnx(session, mel) - expected).abs().max().item()
    print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB; mel [batch, {generator.config.num_mels}, "
          f"frames] -> audio [batch, 1, frames * {_hop(generator)}]); max abs difference from PyTorch on a random "
          f"mel [2, {generator.config.num_mels}, 37]: {difference:.2e}")


def run(args: argparse.Namespace) -> None:
    if args.export_onnx:
        export(args)
        return
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device; use --device cpu (or auto)")
    if args.dtype == "float16" and device != "cuda":
        raise UserError("--dtype float16 runs only on CUDA; on the CPU use bfloat16 or float32")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.max_chunk_frames is not None and args.max_chunk_frames < 16:
        raise UserError(f"--max_chunk_frames must be at least 16 (the chunk overlap), got {args.max_chunk_frames}")
    if (args.text or args.text_file) and not args.taco_weights:
        raise UserError("--text/--text_file need --taco_weights: a Tacotron2 checkpoint (NVIDIA's "
                        "tacotron2_statedict.pt or a save_tacotron2 folder)")
    dtype = DTYPES[args.dtype]

    generator = None
    if args.vocoder == "hifigan":
        if not args.checkpoint:
            raise UserError("--vocoder hifigan needs --checkpoint (or use --vocoder griffin_lim)")
        generator = load_vocoder(args.checkpoint, args.config, device, dtype)
        config = generator.config
        if args.compile:
            # Same numbers, fused kernels; the first input compiles (seconds to minutes), so it pays off on long
            # jobs. dynamic=True: one compile for every input length rather than one per length.
            generator = torch.compile(generator, dynamic=True)
    else:
        config = resolve_config(args.config or "v1")
        device, dtype = "cpu", torch.float32  # griffin_lim runs on the CPU in float32
    jobs = collect_jobs(args, config)
    tacotron = load_tacotron(args.taco_weights, device) if jobs[0].kind == "text" else None
    torch.manual_seed(args.seed)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    jobs.sort(key=lambda job: job.frames)
    audio_seconds = vocoder_seconds = 0.0
    started = time.perf_counter()
    with tqdm(total=len(jobs), unit="file", desc=args.vocoder) as progress:
        for batch_start in range(0, len(jobs), args.batch_size):
            batch = jobs[batch_start:batch_start + args.batch_size]
            mels = []
            for job in batch:
                if job.kind == "npy":
                    mels.append(torch.from_numpy(load_mel(job.source, config)))
                elif job.kind == "audio":
                    mels.append(mel_from_wav(job.source, config))
                else:
                    mels.append(text_to_mel(tacotron, job.source, config, args.max_decoder_steps)[0])
            tick = time.perf_counter()
            if generator is not None:
                audios = vocode_batch(generator, mels, args.max_chunk_frames, batch_size=len(mels))
            else:
                audios = [griffin_lim(mel, config, args.griffin_lim_iters) for mel in mels]
            vocoder_seconds += time.perf_counter() - tick
            for job, audio in zip(batch, audios):
                save_audio(output_dir / f"{job.name}.wav", audio, config.sampling_rate)
                audio_seconds += len(audio) / config.sampling_rate
            progress.update(len(batch))
    total_seconds = time.perf_counter() - started
    print(f"wrote {len(jobs)} file(s) to {output_dir}: {audio_seconds:.1f} s of audio in {total_seconds:.2f} s, "
          f"{audio_seconds / max(total_seconds, 1e-9):.1f}x real time "
          f"(vocoder alone {audio_seconds / max(vocoder_seconds, 1e-9):.1f}x; seconds of audio per second of "
          f"compute) on {device}, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} CPU thread(s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line, not the source line of the warning
        try:
            run(args)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
