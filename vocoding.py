"""Mel -> waveform, and inputs -> mel: what inference.py, evaluate.py, bench.py, train.py's validation, Tacotron2
training's audio logs and the notebook share.

- `load_vocoder`, `vocode` (chunked for long inputs, exact), `vocode_batch` (length-sorted batches, each mel's audio
  as if vocoded alone), `context_frames` (the receptive field, in frames);
- `griffin_lim`, the phase-reconstruction baseline on the same mels;
- `export_onnx`, `onnx_session`, `vocode_onnx`: the generator under ONNX Runtime;
- `mel_from_wav` (copy-synthesis input) and `load_mel` (a checked .npy); mels from text are tacotron2's
  (`tacotron2.teacher_forcing.text_to_mel`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from model import Generator, HifiGanConfig, load_generator
from utils import (
    MelConfig,
    UserError,
    db_mel_to_log_mel,
    load_audio,
    mel_filter_bank,
    mel_spectrogram,
)

# ---------------------------------------------------------------------------------------------
# Vocoding
# ---------------------------------------------------------------------------------------------

def load_vocoder(checkpoint: str | os.PathLike, config: str | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Generator:
    """A generator ready for inference: weight norm folded (one conv per layer, not three ops), eval mode."""
    generator = load_generator(checkpoint, config=config, device="cpu")
    return generator.remove_weight_norm().to(device=device, dtype=dtype).eval()


def hop_of(generator: Generator) -> int:
    # The generator's own upsampling factor, which is what one mel frame becomes.
    return math.prod(generator.config.upsample_rates)


def silence_level(config: HifiGanConfig) -> float:
    """The mel value of digital silence: the clamp floor of the mel scale (log(1e-5), or -max_scaled_abs in dB)."""
    return math.log(1e-5) if config.mel_scale == "log" else -config.max_scaled_abs


def _check_mel(generator: Generator, mel: torch.Tensor) -> torch.Tensor:
    if mel.dim() == 3 and mel.size(0) == 1:
        mel = mel[0]
    if mel.dim() != 2 or mel.size(0) != generator.config.num_mels or mel.size(1) == 0:
        raise UserError(f"mel must be [num_mels={generator.config.num_mels}, frames > 0], got {list(mel.shape)}")
    return mel


def generate(generator: Generator, mels: torch.Tensor) -> torch.Tensor:
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
    frames, hop = mel.size(1), hop_of(generator)
    if max_chunk_frames is None or frames <= max_chunk_frames:
        return generate(generator, mel[None])[0]
    fade = (overlap_frames // 4) * hop
    audio = torch.zeros(frames * hop)
    for start in range(0, frames, max_chunk_frames):
        end = min(start + max_chunk_frames, frames)
        first, last = max(0, start - overlap_frames), min(frames, end + overlap_frames)
        chunk = generate(generator, mel[None, :, first:last])[0]
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


def context_frames(config: HifiGanConfig) -> int:
    """Mel frames of context that make a frame's audio exact: no frame, and no edge of the input (a convolution's zero
    padding), further than this from a frame changes that frame's audio.

    A bound on the generator's receptive field, summed layer by layer in frames: conv_pre's and conv_post's ±3 samples,
    each transposed conv's kernel, and each stage's widest residual block (its dilated kernels in series). V1/V2: 16
    (their audio really changes up to ~12 frames away), V3: 13.
    """
    def block_reach(kernel_size: int, dilations: tuple[int, ...]) -> int:  # in samples, one side
        # ResBlock1: per dilation, a dilated conv then a plain one; ResBlock2: the dilated conv alone.
        plain = math.ceil((kernel_size - 1) / 2) if config.resblock == "1" else 0
        return sum(math.ceil((kernel_size - 1) * d / 2) + plain for d in dilations)

    reach, rate = 3.0, 1  # conv_pre: kernel 7 at the frame rate
    for upsample, kernel in zip(config.upsample_rates, config.upsample_kernel_sizes):
        rate *= upsample
        reach += kernel / rate  # a transposed conv spreads each input sample over `kernel` output samples
        reach += max(map(block_reach, config.resblock_kernel_sizes, config.resblock_dilation_sizes)) / rate
    reach += 3 / rate  # conv_post
    # +1: a frame's samples lie up to one frame after its start.
    return math.ceil(reach) + 1


def cuda_graph_call(function: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`function(x)` replayed from CUDA graphs, one per input shape: the host launches a whole call (~200 kernels for
    V1) at once instead of kernel by kernel, which is most of the time of a short utterance on a fast GPU.

    A shape's first call runs eagerly, on a side stream (it initialises cuDNN's kernels for that shape, as capture
    needs); its second is captured and replayed; later ones replay. So a shape seen once costs nothing extra, and
    one seen twice one capture. All graphs share one memory pool: safe because calls run one at a time and each
    returns a copy of its output (a later replay may reuse the memory of an earlier one's). If a capture fails, the
    calls run eagerly from then on, with a warning."""
    graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
    seen: set[tuple] = set()
    pool = None

    def call(x: torch.Tensor) -> torch.Tensor:
        nonlocal pool
        key = (tuple(x.shape), x.dtype, x.device)
        if key in graphs:
            graph, static_input, static_output = graphs[key]
            static_input.copy_(x)
            graph.replay()
            return static_output.clone()
        if key not in seen or pool is False:
            seen.add(key)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                output = function(x)
            torch.cuda.current_stream().wait_stream(side)
            return output
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
        static_input, graph = x.clone(), torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                static_output = function(static_input)
        except RuntimeError as error:
            warnings.warn(f"CUDA graph capture failed, running eagerly instead: {error}", stacklevel=2)
            pool = False
            return function(x)
        graphs[key] = graph, static_input, static_output
        graph.replay()
        return static_output.clone()
    return call


class GraphedGenerator:
    """A generator for `vocode_batch` that runs on fixed shapes, so that a few CUDA graphs serve every input: batches
    of `batch_size` rows (filled up with silent rows) and `frames_multiple` frames (padded with silence; the tails
    this padding touches are vocoded again exactly, as for batch mates). On a CPU the same shapes run eagerly (what
    the tests check); on a GPU each shape used more than once becomes a graph (`cuda_graph_call`).

    Shapes that would each be used once run eagerly on the generator itself: a mel longer than vocode_batch's
    `max_chunk_frames` (chunked by `vocode`), and the tail of a mel shorter than 2 x `context_frames`."""

    def __init__(self, generator: Generator, batch_size: int, frames_multiple: int = 64):
        self.generator, self.config = generator, generator.config
        self.batch_size, self.frames_multiple = batch_size, frames_multiple
        device = next(generator.parameters()).device
        self.call = cuda_graph_call(generator) if device.type == "cuda" else generator

    def parameters(self):  # (for `generate`: the device and dtype inputs go to)
        return self.generator.parameters()

    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        return self.call(mel)


def vocode_batch(generator: Generator | GraphedGenerator, mels: list[torch.Tensor],
                 max_chunk_frames: int | None = None, batch_size: int = 8) -> list[torch.Tensor]:
    """Vocode many mels; returns float32 CPU audio [frames * hop] for each, in the input order, each what `vocode`
    makes of that mel alone (to float32 rounding), whatever it is batched with.

    Mels are sorted by length and vocoded `batch_size` at a time, padded to the longest of their batch (sorting keeps
    that padding small); a mel longer than `max_chunk_frames` goes alone through `vocode`'s chunking. The padding
    would leak into the last frames of a shorter mel through the receptive field (up to 7e-3 on real speech), so
    those frames are vocoded again from the mel alone: its last `context_frames` frames with as many frames of its
    own context before them, those tails batched with each other (they have equal lengths: no padding). A
    `GraphedGenerator` gets its fixed shapes: its batch size and lengths rounded up to its `frames_multiple`.
    """
    fixed = isinstance(generator, GraphedGenerator)
    eager = generator.generator if fixed else generator
    batch_size = generator.batch_size if fixed else batch_size
    mels = [_check_mel(generator, mel) for mel in mels]
    hop, silence = hop_of(generator), silence_level(generator.config)
    context = context_frames(generator.config)
    outputs: list[torch.Tensor | None] = [None] * len(mels)
    short = []
    for i, mel in enumerate(mels):
        if max_chunk_frames is not None and mel.size(1) > max_chunk_frames:
            outputs[i] = vocode(eager, mel, max_chunk_frames)
        else:
            short.append(i)
    short.sort(key=lambda i: mels[i].size(1))

    def rows_of(batch: list[torch.Tensor], frames: int) -> torch.Tensor:
        """The batch as one tensor of `frames` frames (silence after each mel), with silent rows to the fixed size."""
        padded = torch.full((batch_size if fixed else len(batch), batch[0].size(0), frames), silence)
        for row, mel in enumerate(batch):
            padded[row, :, :mel.size(1)] = mel
        return padded

    padded_ones = []
    with torch.inference_mode():
        for batch_start in range(0, len(short), batch_size):
            indices = short[batch_start:batch_start + batch_size]
            frames = mels[indices[-1]].size(1)
            if fixed:
                frames = math.ceil(frames / generator.frames_multiple) * generator.frames_multiple
            audio = generate(generator, rows_of([mels[i] for i in indices], frames))
            for row, i in enumerate(indices):
                outputs[i] = audio[row, :mels[i].size(1) * hop].clone()
            padded_ones += [i for i in indices if mels[i].size(1) < frames]
        # Tails of equal length batch together; a mel of under 2 x context frames is vocoded again whole.
        by_length: dict[int, list[int]] = {}
        for i in padded_ones:
            by_length.setdefault(min(mels[i].size(1), 2 * context), []).append(i)
        for length, indices in by_length.items():
            for batch_start in range(0, len(indices), batch_size):
                batch = indices[batch_start:batch_start + batch_size]
                tails = rows_of([mels[i][:, mels[i].size(1) - length:] for i in batch], length)
                audio = generate(generator if length == 2 * context else eager, tails)
                keep = (context if length == 2 * context else length) * hop  # a whole short mel: all of it
                for row, i in enumerate(batch):
                    outputs[i][-keep:] = audio[row, -keep:]
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


def onnx_session(path: str | os.PathLike, threads: int | None = None, device: str | torch.device = "cpu"):
    """An onnxruntime InferenceSession of a model written by export_onnx, on the CPU or, for a CUDA device, on
    onnxruntime's CUDA provider (the onnxruntime-gpu package); threads: intra-op CPU threads (None: onnxruntime's
    default, one per core)."""
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
    device = torch.device(device)
    providers: list = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise UserError(f"ONNX on {device} needs onnxruntime's CUDA provider, which this onnxruntime lacks "
                            f"(it has {', '.join(onnxruntime.get_available_providers())}): pip install "
                            "onnxruntime-gpu in place of onnxruntime, or run ONNX on the CPU")
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
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


def griffin_lim(mel: torch.Tensor, config: MelConfig | HifiGanConfig, n_iters: int = 60) -> torch.Tensor:
    """The classical baseline from the same mel: mel -> linear magnitude -> fast Griffin-Lim -> audio [frames * hop].

    The magnitude is the pseudo-inverse of the mel filter bank, clamped at 0 (librosa's non-negative least
    squares fit an LJSpeech mel no better and took ~1000x longer). The STFT is docs/design.md §1's: frame i covers the
    signal reflect-padded by (n_fft - hop) / 2 (the vocoder's frames), so the output lines up sample for sample
    with what HiFi-GAN makes from the same mel. Phase starts random (seeded) and uses momentum 0.99
    (Perraudin et al., 2013; librosa's default). `config`: the mel's settings, or a vocoder config (its input mel).
    """
    config = config.mel if isinstance(config, HifiGanConfig) else config
    mel = mel.detach().float().cpu()
    if mel.dim() != 2 or mel.size(0) != config.num_mels or mel.size(1) == 0:
        raise UserError(f"mel must be [num_mels={config.num_mels}, frames > 0], got {list(mel.shape)}")
    if config.mel_scale == "db":
        mel = db_mel_to_log_mel(mel, config.min_db, config.max_scaled_abs)
    basis = mel_filter_bank(config.sampling_rate, config.n_fft, config.num_mels, float(config.fmin),
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
