"""Benchmark the plain fp32 eager path against the fast paths, in one run, and say what each costs in quality.

    python bench.py [--device cpu|cuda|auto] [--quick] [--compile] [--output bench_results.json]

Training: the full GAN step (generator + both discriminators, forward and backward, both optimisers:
train.train_step itself) for V1 at batch 2 × 8192 samples on a CPU (16 × 8192 on a GPU): steps/s, audio
samples/s and peak memory, plain fp32 eager against the fast path (bf16 autocast through accelerate, plus TF32
and fused AdamW on a GPU) and, with --compile, torch.compile. Quality cost: log-mel L1 between what the fast-
and the plain-trained generators (same initial weights, same batch) make of the batch's mel afterwards.

Inference: ×real-time of V1, V2 and V3 (--presets all: every sample-rate preset too, with its parameter count)
on a 10-second utterance at batch 1 and at a throughput batch (4 on a
CPU, 16 on a GPU). Plain = weight norm live, fp32, no_grad; fast = weight norm folded + inference_mode in fp32,
bf16 autocast (and fp16 on a GPU), torch.compile with --compile, and ONNX Runtime (its CUDA provider on a GPU,
where onnxruntime-gpu is installed). Quality cost:
log-mel L1 between each fast output and the plain output for the same weights and input.

Warm-up runs are excluded. Every round times the plain path and each fast path back to back, so each speed-up
is the median of per-round ratios and stays fair on a busy machine; times are medians. --quick keeps every
column but shrinks everything (half-second utterances, batch 2, discriminators 4× thinner, 2048-sample
segments, fewer rounds): under a minute on 2 CPU cores, for a smoke test, not for numbers to quote.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

import metrics
from model import (
    LRELU_SLOPE,
    PRESETS,
    DiscriminatorP,
    Generator,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    build_generator,
    channels_last,
    discriminator_loss,
    feature_matching_loss,
    full_precision,
    generator_loss,
    load_generator,
    train_step,
)
from utils import load_audio, mel_spectrogram, pick_device, run_cli
from vocoding import GraphedGenerator, cuda_graph_call, vocode_batch

QUICK_SECONDS = 0.5  # --quick's utterance length


def speechlike_audio(seconds: float, sampling_rate: int = 22050, batch: int = 1, pitch: float = 1.0
                     ) -> torch.Tensor:
    """A gliding harmonic tone with syllable-like bursts: its mel looks like speech to a vocoder."""
    t = torch.arange(int(seconds * sampling_rate)) / sampling_rate
    clips = []
    for i in range(batch):
        f0 = pitch * (110 + 20 * i) * (1 + 0.15 * torch.sin(2 * math.pi * 0.7 * t))
        phase = 2 * math.pi * torch.cumsum(f0, 0) / sampling_rate
        voiced = sum(torch.sin(k * phase) / k for k in range(1, 20))
        envelope = torch.clamp(torch.sin(2 * math.pi * 3 * t + i), min=0) ** 0.5
        clips.append(0.5 * voiced * envelope / voiced.abs().max())
    return torch.stack(clips)


def recorded_audio(path: str, seconds: float, sampling_rate: int, batch: int) -> torch.Tensor:
    """A recording looped to `seconds`, each batch item starting elsewhere in it: the quality column then
    measures what a listener would hear (a synthetic signal's silent gaps exaggerate a raised noise floor)."""
    audio = torch.from_numpy(load_audio(path, sampling_rate))
    length = int(seconds * sampling_rate)
    looped = audio.repeat(math.ceil((length + batch * sampling_rate) / len(audio)))
    return torch.stack([looped[i * sampling_rate:i * sampling_rate + length] for i in range(batch)])


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: writing 5 to clear_refs resets the process's peak resident set size (VmHWM)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_gb(device: torch.device) -> float | None:
    """GPU: peak allocated since the reset. CPU: the process's peak resident set since the reset (all of it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) / 2 ** 20 for line in status.splitlines() if line.startswith("VmHWM")), None)


def paired_timings(paths: dict[str, Callable], device: torch.device, rounds: int, warmup: int = 1
                   ) -> tuple[dict, dict[str, dict]]:
    """Run every path `warmup` times (untimed), then `rounds` rounds that time every path back to back.

    The first path is the plain one. Returns (each path's last warm-up output, and per path: median seconds,
    median of the per-round plain/path ratios, peak memory).
    """
    outputs = {}
    for _ in range(warmup):
        outputs = {name: fn() for name, fn in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    peaks: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            reset_peak_memory(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            peak = peak_memory_gb(device)
            if peak is not None:
                peaks[name].append(peak)
    plain = times[next(iter(paths))]
    return outputs, {name: {"seconds": statistics.median(t), "speedup": statistics.median(p / f for p, f in
                                                                                             zip(plain, t)),
                            "peak_memory_gb": max(peaks[name], default=None)} for name, t in times.items()}


def batch_log_mel_l1(audio: torch.Tensor, reference: torch.Tensor, config) -> float:
    """metrics.log_mel_l1 (evaluate.py's, the loss mel's) averaged over a batch of outputs [B, 1, T]."""
    pairs = zip(reference.float().cpu().flatten(0, -2), audio.float().cpu().flatten(0, -2))
    return statistics.fmean(metrics.log_mel_l1(ref, out, config) for ref, out in pairs)


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------

def inference_paths(generator: Generator, device: torch.device, use_compile: bool, onnx_dir: Path | None,
                    example: torch.Tensor) -> dict[str, Callable]:
    """name -> function(mel) -> audio [B, 1, T]: the official inference first (weight norm folded, fp32, no_grad; on a
    GPU with cuDNN's default TF32 convolutions), then every path of this repo that the device has, for mels shaped
    like `example`."""
    folded = generator.folded_copy().to(device)
    cuda = device.type == "cuda"

    def official(mel):
        torch.backends.cudnn.allow_tf32 = True
        channels_last(folded, enabled=False)
        with torch.no_grad():
            return folded(mel)

    def fast(dtype: torch.dtype | None, model: Callable = folded, layout: bool = False, tf32: bool = False,
             benchmark: bool = False):
        def run(mel):
            torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = tf32, benchmark
            channels_last(folded, enabled=layout)
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                return model(mel).float()
        return run

    paths = {"official fp32": official, "folded fp32": fast(None)}
    if not cuda:
        paths["folded bf16"] = fast(torch.bfloat16)
    else:  # (the graphs are captured in the layout and with the flags their function sets)
        paths["fp16 channels-last"] = fast(torch.float16, layout=True)
        paths["bf16 channels-last"] = fast(torch.bfloat16, layout=True)
        paths["tf32 + CUDA graph"] = cuda_graph_call(fast(None, tf32=True))
        paths["fp16 channels-last + CUDA graph"] = cuda_graph_call(fast(torch.float16, layout=True))
        paths["bf16 channels-last + CUDA graph"] = cuda_graph_call(fast(torch.bfloat16, layout=True))
        paths["fp16 channels-last + CUDA graph, cudnn.benchmark"] = cuda_graph_call(
            fast(torch.float16, layout=True, benchmark=True))
        torch.backends.cudnn.benchmark = False
        channels_last(folded, enabled=False)
        # What inference.py runs by default: the generator cast to float16, channels-last, through vocode_batch's
        # fixed shapes and their CUDA graphs (the padded tail vocoded again), mels and audio through host memory.
        half = generator.folded_copy().to(device, torch.float16)
        channels_last(half)
        graphed = GraphedGenerator(half, batch_size=example.size(0))
        paths["inference.py: fp16 channels-last, fixed shapes + CUDA graphs"] = lambda mel: torch.stack(
            vocode_batch(graphed, list(mel.cpu()))).unsqueeze(1).to(device)
    if use_compile:  # exact in fp32; each its own compiled module (autocast would otherwise force recompiles)
        paths["compiled fp32"] = fast(None, torch.compile(folded))
        paths["compiled bf16"] = fast(torch.bfloat16, torch.compile(folded))
    if onnx_dir is not None:
        from vocoding import export_onnx, onnx_session
        session = onnx_session(export_onnx(folded, onnx_dir / "generator.onnx"), threads=torch.get_num_threads(),
                               device=device)
        # (on a GPU the mel goes through host memory, as it would for a caller holding numpy arrays)
        paths["onnx fp32"] = lambda mel: torch.from_numpy(session.run(["audio"], {"mel": mel.cpu().numpy()})[0]).to(
            mel.device)
    return paths


def bench_inference(device: torch.device, quick: bool, use_compile: bool, rounds: int,
                    checkpoints: dict[str, str], onnx_dir: Path | None, wav: str | None = None,
                    presets: tuple[str, ...] = ("v1", "v2", "v3")) -> list[dict]:
    rows = []
    seconds = QUICK_SECONDS if quick else 10.0
    throughput_batch = 2 if quick else 16 if device.type == "cuda" else 4
    for preset in presets:
        if preset in checkpoints:
            generator, weights = load_generator(checkpoints[preset]).to(device), "trained"
        else:
            torch.manual_seed(0)
            generator, weights = build_generator(preset).to(device).eval(), "random"
        config = generator.config
        parameters = sum(p.numel() for p in generator.parameters())
        for batch in (1, throughput_batch):
            audio = recorded_audio(wav, seconds, config.sampling_rate, batch) if wav else \
                speechlike_audio(seconds, config.sampling_rate, batch)
            mel = mel_spectrogram(audio, **config.mel_kwargs())
            mel = mel.to(device)
            paths = inference_paths(generator, device, use_compile, onnx_dir, mel)  # (graphs are per shape)
            compile_s = None
            if use_compile:  # the first call compiles (and recompiles for a new shape): time it apart
                start = time.perf_counter()
                paths["compiled fp32"](mel)
                paths["compiled bf16"](mel)
                compile_s = time.perf_counter() - start
            # Two untimed rounds: a CUDA-graph path runs a new shape eagerly, then captures it
            outputs, timings = paired_timings({name: (lambda fn=fn, mel=mel: fn(mel)) for name, fn in paths.items()},
                                              device, rounds, warmup=2 if device.type == "cuda" else 1)
            audio_seconds = batch * mel.shape[-1] * config.hop_size / config.sampling_rate
            reference_s = timings["official fp32"]["seconds"]
            for name in list(paths)[1:]:
                rows.append({"model": preset, "weights": weights, "parameters": parameters,
                             "sampling_rate": config.sampling_rate, "batch": batch, "audio_s": audio_seconds,
                             "path": name, "official_xrt": audio_seconds / reference_s,
                             "fast_xrt": audio_seconds / timings[name]["seconds"], "speedup": timings[name]["speedup"],
                             "log_mel_l1_vs_fp32": batch_log_mel_l1(outputs[name], outputs["folded fp32"], config),
                             "compile_s": compile_s if name.startswith("compiled") else None})
                print(format_inference_row(rows[-1]), flush=True)
    return rows


def format_inference_row(row: dict) -> str:
    compile_note = f" (compile {row['compile_s']:.0f} s)" if row["compile_s"] else ""
    return (f"| {row['model']} ({row['weights']}, {row['parameters'] / 1e6:.2f} M, {row['sampling_rate']} Hz) | "
            f"{row['batch']} | {row['path']}{compile_note} | "
            f"{row['official_xrt']:.1f}× | {row['fast_xrt']:.1f}× | **{row['speedup']:.2f}×** | "
            f"{row['log_mel_l1_vs_fp32']:.4f} |")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def official_period_forward(self: DiscriminatorP, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """DiscriminatorP as the official model computes it: (k, 1) Conv2d kernels over the [T / period, period] image
    (this repo folds the phases into the batch instead; same weights, same numbers)."""
    feature_maps = []
    batch, channels, length = x.shape
    if length % self.period:
        x = torch.nn.functional.pad(x, (0, self.period - length % self.period), "reflect")
        length = x.shape[-1]
    x = x.view(batch, channels, length // self.period, self.period)
    for layer in self.convs:
        x = torch.nn.functional.leaky_relu(layer(x), LRELU_SLOPE)
        feature_maps.append(x)
    x = self.conv_post(x)
    feature_maps.append(x)
    return torch.flatten(x, 1, -1), feature_maps


def official_loss_mel(audio: torch.Tensor, mel_kwargs: dict) -> torch.Tensor:
    """The loss mel with what the official mel_spectrogram adds to each call: two range checks read on the host, and
    a filter bank rebuilt by librosa and copied to the device (its cache is keyed so that it never hits)."""
    import librosa
    if torch.min(audio) < -1.0 or torch.max(audio) > 1.0:
        print("official mel: audio out of range")
    basis = librosa.filters.mel(sr=mel_kwargs["sampling_rate"], n_fft=mel_kwargs["n_fft"],
                                n_mels=mel_kwargs["num_mels"], fmin=mel_kwargs["fmin"], fmax=mel_kwargs["fmax"])
    torch.from_numpy(basis).float().to(audio.device)
    return mel_spectrogram(audio, **mel_kwargs)


def official_step(generator, mpd, msd, optim_g, optim_d, mel, audio, loss_mel_target, mel_kwargs) -> dict:
    """One step of the official train.py: G forward, D step on detached audio, G step (adversarial + feature
    matching x2 + mel L1 x45); no finiteness checks, no gradient norms."""
    audio = audio.unsqueeze(1)
    audio_generated = generator(mel)
    mel_generated = official_loss_mel(audio_generated.squeeze(1), mel_kwargs)
    optim_d.zero_grad()
    real, fake, _, _ = mpd(audio, audio_generated.detach())
    loss_disc = discriminator_loss(real, fake)
    real, fake, _, _ = msd(audio, audio_generated.detach())
    loss_disc = loss_disc + discriminator_loss(real, fake)
    loss_disc.backward()
    optim_d.step()
    optim_g.zero_grad()
    loss_mel = torch.nn.functional.l1_loss(loss_mel_target, mel_generated)
    _, fake_period, real_maps_period, fake_maps_period = mpd(audio, audio_generated)
    _, fake_scale, real_maps_scale, fake_maps_scale = msd(audio, audio_generated)
    loss_gen = generator_loss(fake_scale) + generator_loss(fake_period) + 45 * loss_mel + 2 * (
        feature_matching_loss(real_maps_period, fake_maps_period) + feature_matching_loss(real_maps_scale,
                                                                                          fake_maps_scale))
    loss_gen.backward()
    optim_g.step()
    return {"loss_generator": loss_gen.detach(), "loss_mel": loss_mel.detach()}


class TrainingPath(NamedTuple):
    """One way to run a training step. "official" is the official loop as users run it (fp32 eager, cuDNN's
    defaults: TF32 convolutions, no autotuning; its train.py turns cudnn.benchmark on); "plain fp32" is this repo's
    train_step without any fast option; the "fast" paths are what train.py runs on a GPU."""
    official: bool
    precision: str  # "fp32"; "bf16" (all networks under bf16 autocast), "bf16 generator", "bf16 discriminators"
    tf32: bool
    benchmark: bool  # cudnn.benchmark
    channels_last: bool
    fused: bool  # fused AdamW
    graph: bool  # one CUDA graph per step


GPU_TRAINING_PATHS: dict[str, TrainingPath] = {
    "official fp32": TrainingPath(True, "fp32", True, False, False, False, False),
    "official fp32 + cudnn.benchmark": TrainingPath(True, "fp32", True, True, False, False, False),
    "plain fp32": TrainingPath(False, "fp32", False, False, False, False, False),
    "fast tf32": TrainingPath(False, "fp32", True, False, False, True, False),
    "fast tf32 + CUDA graph": TrainingPath(False, "fp32", True, False, False, True, True),
    # cuDNN's TF32 kernels are NHWC too: the profile of the path above still has ~12 % transposes
    "fast tf32 channels-last + CUDA graph": TrainingPath(False, "fp32", True, False, True, True, True),
    "fast bf16 channels-last": TrainingPath(False, "bf16", True, False, True, True, False),
    "fast bf16 channels-last + CUDA graph": TrainingPath(False, "bf16", True, False, True, True, True),
    # Which side bf16's quality cost comes from: each network in bf16 channels-last alone, the other TF32
    "fast bf16 discriminators + CUDA graph": TrainingPath(False, "bf16 discriminators", True, False, True, True, True),
    "fast bf16 generator + CUDA graph": TrainingPath(False, "bf16 generator", True, False, True, True, True),
}
CPU_TRAINING_PATHS: dict[str, TrainingPath] = {
    "official fp32": TrainingPath(True, "fp32", False, False, False, False, False),
    "plain fp32": TrainingPath(False, "fp32", False, False, False, False, False),
    "fast fp32 (fused AdamW)": TrainingPath(False, "fp32", False, False, False, True, False),
    "fast bf16": TrainingPath(False, "bf16", False, False, False, True, False),
    "fast bf16 discriminators": TrainingPath(False, "bf16 discriminators", False, False, False, True, False),
}


def training_batch(index: int, config, batch: int, segment: int, device: torch.device):
    """A reproducible training batch: speech-like audio with its own pitch and level per index."""
    generator = torch.Generator().manual_seed(index)
    audio = speechlike_audio(segment / config.sampling_rate, config.sampling_rate, batch,
                             pitch=float(torch.empty(()).uniform_(0.7, 1.6, generator=generator)))
    audio = (audio * float(torch.empty(()).uniform_(0.3, 1.0, generator=generator))).to(device)
    return mel_spectrogram(audio, **config.mel_kwargs()), audio, mel_spectrogram(audio, **config.mel_kwargs(
        for_loss=True))


def setup_training_path(path: TrainingPath, config, device: torch.device, accelerator) -> tuple[Callable, Generator]:
    """Fresh models from seed 0 and a `step(mel, audio, loss_mel) -> losses` function for one training path."""
    from training import CudaGraphStep
    official, precision, tf32, benchmark, use_channels_last, fused, graph = path
    torch.manual_seed(0)  # every path starts from the same weights
    divisor = config.discriminator_width_divisor
    generator = Generator(config).to(device)
    mpd = MultiPeriodDiscriminator(config.mpd_periods, divisor).to(device)
    msd = MultiScaleDiscriminator(divisor).to(device)
    if official:
        for discriminator in mpd.discriminators:
            discriminator.forward = official_period_forward.__get__(discriminator)
    # bf16 for all three networks or one side (the other marked full_precision, in fp32 as train.py runs it with
    # --mixed_precision_networks); channels-last for those in bf16
    fp32 = {"bf16 generator": (mpd, msd), "bf16 discriminators": (generator,)}.get(precision, ())
    full_precision(*fp32)
    channels_last(*(m for m in (generator, mpd, msd) if m not in fp32), enabled=use_channels_last)
    # (a captured optimiser step must be `capturable`: its step counters live on the device)
    optimizer_kwargs = {"betas": (0.8, 0.99), "fused": fused, "capturable": graph}
    optim_g = torch.optim.AdamW(generator.parameters(), 2e-4, **optimizer_kwargs)
    # (the official code builds its discriminator optimiser over the MSD's parameters first)
    discriminator_parameters = [*msd.parameters(), *mpd.parameters()] if official else \
        [*mpd.parameters(), *msd.parameters()]
    optim_d = torch.optim.AdamW(discriminator_parameters, 2e-4, **optimizer_kwargs)
    if precision != "fp32":  # a module accelerate prepares runs its forward under its bf16 autocast
        generator, mpd, msd, optim_g, optim_d = accelerator.prepare(generator, mpd, msd, optim_g, optim_d)
    kwargs = config.mel_kwargs(for_loss=True)

    def step(mel, audio, loss_mel):
        if official:
            return official_step(generator, mpd, msd, optim_g, optim_d, mel, audio, loss_mel, kwargs)
        return train_step(accelerator, generator, mpd, msd, optim_g, optim_d, mel, audio, loss_mel, kwargs)
    run = CudaGraphStep(step) if graph else step

    def flagged_step(mel, audio, loss_mel):
        if device.type == "cuda":  # global switches: set for each path's own step
            torch.backends.cudnn.allow_tf32 = tf32 or official  # the official loop runs cuDNN's default (TF32)
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = benchmark
        return run(mel, audio, loss_mel)
    return flagged_step, generator


def bench_training(device: torch.device, quick: bool, steps: int, only: list[str] | None = None,
                   quality_steps: int = 0, quality_path: str | None = None) -> tuple[list[dict], dict | None]:
    """Every training path from the same initial weights on the same batch, in interleaved rounds; then, with
    `quality_steps`, the plain fp32 path and `quality_path` trained that many steps on the same sequence of batches,
    and their mel L1 compared (the quality a fast path must not trade)."""
    import dataclasses

    from accelerate import Accelerator
    if quick:  # V1's generator, discriminators 4× thinner, a short segment: the same step, smaller
        config, batch, segment = dataclasses.replace(PRESETS["v1"], discriminator_width_divisor=4), 1, 2048
    else:
        config, batch, segment = PRESETS["v1"], 16 if device.type == "cuda" else 2, 8192
    all_paths = GPU_TRAINING_PATHS if device.type == "cuda" else CPU_TRAINING_PATHS
    paths = {name: path for name, path in all_paths.items()
             if not only or name in only or path.official or name == "plain fp32"}
    # One bf16 accelerator: a module it prepares runs under bf16 autocast; the others stay fp32 eager.
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    rows = bench_training_speed(paths, config, batch, segment, device, accelerator, quick, steps) if steps else []
    quality = None
    if quality_steps > 0:
        quality = training_quality(config, batch, segment, device, accelerator, quality_steps,
                                   (quality_path or list(paths)[-1]).split(","), all_paths)
    if device.type == "cuda":  # inference's fp32 paths are plain fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
    return rows, quality


def bench_training_speed(paths: dict[str, TrainingPath], config, batch: int, segment: int, device: torch.device,
                         accelerator, quick: bool, steps: int) -> list[dict]:
    """Every path from the same initial weights on the same batch, in interleaved rounds of `steps` timed steps."""
    mel, audio, loss_mel = training_batch(0, config, batch, segment, device)
    setups = {name: setup_training_path(path, config, device, accelerator) for name, path in paths.items()}
    losses: dict[str, list[float]] = {name: [] for name in paths}
    first_step_s = {}
    for name, (step, _) in setups.items():  # the first step (allocation, optimiser state, autotuning)
        start = time.perf_counter()
        losses[name].append(float(step(mel, audio, loss_mel)["loss_generator"]))
        first_step_s[name] = time.perf_counter() - start
    # Graph paths capture on their third call: two more untimed rounds.
    _, timings = paired_timings({name: (lambda s=s: s[0](mel, audio, loss_mel)) for name, s in setups.items()},
                                device, steps, warmup=1 if quick else 3)

    def generate(generator: Generator) -> torch.Tensor:  # fp32, whatever the training precision was
        copy = Generator(config).to(device)
        copy.load_state_dict(generator.state_dict())
        with torch.no_grad():
            return copy(mel)

    reference_name = next(iter(paths))
    reference = generate(setups["plain fp32"][1])
    rows = []
    for name, (_, generator) in setups.items():
        seconds = timings[name]["seconds"]
        rows.append({"model": "v1", "batch": batch, "segment": segment,
                     "discriminator_width_divisor": config.discriminator_width_divisor, "path": name,
                     "seconds_per_step": seconds, "steps_per_s": 1 / seconds,
                     "samples_per_s": batch * segment / seconds, "reference": reference_name,
                     "speedup_vs_reference": timings[name]["speedup"],
                     "peak_memory_gb": timings[name]["peak_memory_gb"], "first_step_s": first_step_s[name],
                     "all_finite": all(map(math.isfinite, losses[name])),
                     "log_mel_l1_vs_plain": batch_log_mel_l1(generate(generator), reference, config)})
        print(format_training_row(rows[-1], device), flush=True)
    del setups
    return rows


def training_quality(config, batch: int, segment: int, device: torch.device, accelerator, steps: int,
                     fast: list[str], all_paths: dict[str, TrainingPath]) -> dict:
    """Train plain fp32 and each `fast` path for `steps` steps from the same weights on the same batches; the mel L1
    of each (mean of the last fifth of the steps) and its ratio to plain fp32's."""
    result: dict = {"steps": steps, "fast_paths": fast}
    for name in ("plain fp32", *fast):
        step, _ = setup_training_path(all_paths[name], config, device, accelerator)
        curve = [step(*training_batch(i, config, batch, segment, device))["loss_mel"] for i in range(steps)]
        curve = torch.stack([torch.as_tensor(v, device=device).float() for v in curve]).tolist()
        tail = curve[-max(steps // 5, 1):]
        result[name] = {"mel_l1_first": curve[0], "mel_l1_last": statistics.fmean(tail),
                        "all_finite": all(map(math.isfinite, curve))}
        result[name]["ratio_to_plain"] = result[name]["mel_l1_last"] / result["plain fp32"]["mel_l1_last"]
        print(f"quality, {steps} steps from the same weights and batches: {name}: mel L1 (mean of the last "
              f"{len(tail)}) {result[name]['mel_l1_last']:.4f}, {result[name]['ratio_to_plain']:.4f}× plain fp32's",
              flush=True)
    return result


def profile_training(device: torch.device, quick: bool, output: Path, only: list[str] | None) -> dict:
    """torch.profiler over 3 steps of each training path: the top GPU kernels (share of GPU time, calls per step) and
    how much of the wall time the GPU was busy. Written to `output` as markdown."""
    import dataclasses

    from accelerate import Accelerator
    from torch.profiler import ProfilerActivity, profile
    if quick:
        config, batch, segment = dataclasses.replace(PRESETS["v1"], discriminator_width_divisor=4), 1, 2048
    else:
        config, batch, segment = PRESETS["v1"], 16 if device.type == "cuda" else 2, 8192
    all_paths = GPU_TRAINING_PATHS if device.type == "cuda" else CPU_TRAINING_PATHS
    names = [name for name, path in all_paths.items() if (not only or name in only or path.official)
             and "benchmark" not in name]
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    inputs = training_batch(0, config, batch, segment, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    lines, summary = [f"# Training step profile: V1, batch {batch} × {segment}, {device}\n"], {}
    for name in names:
        step, _ = setup_training_path(all_paths[name], config, device, accelerator)
        for _ in range(4):  # warm-up; graph paths capture on their third call
            step(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(3):
                step(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / 3
        # GPU: the kernels; CPU: the operators (self time, so that nothing is counted twice)
        cuda = device.type == "cuda"
        events = [e for e in prof.key_averages() if (str(getattr(e, "device_type", "")).endswith("CUDA") if cuda
                                                      else e.self_cpu_time_total > 0)]
        busy_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
        events = [e for e in events if busy_time(e) > 0]
        busy = sum(map(busy_time, events)) / 3 / 1e6
        summary[name] = {"wall_s_per_step": wall, "busy_s_per_step": busy}
        lines.append(f"\n## {name}: {wall * 1e3:.1f} ms a step, {'GPU kernels' if cuda else 'operators'} "
                     f"{busy * 1e3:.1f} ms ({100 * busy / wall:.0f} % busy)\n\n"
                     f"| {'kernel' if cuda else 'operator'} | share of {'GPU' if cuda else 'CPU'} time | "
                     "calls per step |\n| --- | ---: | ---: |")
        total = max(sum(map(busy_time, events)), 1e-9)
        table = [f"| `{event.key[:90]}` | {100 * busy_time(event) / total:.1f} % | {event.count / 3:.0f} |"
                 for event in sorted(events, key=lambda e: -busy_time(e))[:15]]
        lines.extend(table)
        print("\n".join([lines[-len(table) - 1], *table[:6]]), flush=True)
        del step
    output.write_text("\n".join(lines) + "\n")
    print(f"wrote the profile to {output}")
    return summary


def format_training_row(row: dict, device: torch.device) -> str:
    memory = "n/a" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.2f} GiB"
    memory += "" if device.type == "cuda" else " RSS"
    return (f"| {row['model']} | {row['batch']}×{row['segment']} | {row['path']} | {row['seconds_per_step']:.3f} | "
            f"{row['steps_per_s']:.3f} | {row['samples_per_s']:.0f} | {memory} | "
            f"**{row['speedup_vs_reference']:.2f}×** | {row['log_mel_l1_vs_plain']:.4f} | "
            f"{'yes' if row['all_finite'] else 'NO'} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="every column, small sizes: under a minute on a CPU")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile for inference")
    parser.add_argument("--rounds", type=int, default=None, help="timed inference rounds (default 5, quick 2)")
    parser.add_argument("--train_steps", type=int, default=None, help="timed training rounds (default 5, quick 2)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="PRESET=PATH",
                        help="trained weights for a preset, e.g. v2=generator_v2 (default: random weights)")
    parser.add_argument("--presets", default="v1,v2,v3",
                        help=f"inference presets, comma-separated, or 'all' ({','.join(PRESETS)})")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--skip_inference", action="store_true")
    parser.add_argument("--training_paths", help="comma-separated training paths to time besides the official "
                        f"reference (GPU: {', '.join(GPU_TRAINING_PATHS)}; CPU: {', '.join(CPU_TRAINING_PATHS)})")
    parser.add_argument("--quality_steps", type=int, default=0, help="also train plain fp32 and --quality_path this "
                        "many steps from the same weights and batches and compare their mel L1 (the GPU table: 300)")
    parser.add_argument("--quality_path", help="the fast path(s) of the quality comparison, comma-separated "
                        "(default: the last timed)")
    parser.add_argument("--skip_timing", action="store_true", help="training: only the quality comparison")
    parser.add_argument("--profile", metavar="FILE.md", help="profile 3 training steps of each path (torch.profiler) "
                        "and write the top GPU kernels and the GPU's busy share per path to this file")
    parser.add_argument("--wav", help="inference input: this recording, looped (default: a synthetic speech-like "
                        "signal); with --checkpoint, the quality column is then what a listener would hear")
    parser.add_argument("--no_onnx", action="store_true", help="skip the ONNX Runtime column")
    parser.add_argument("--output", "--json", default="bench_results.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = pick_device(args.device)
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.train_steps or (2 if args.quick else 5)
    checkpoints = dict(spec.split("=", 1) for spec in args.checkpoint)
    presets = tuple(PRESETS) if args.presets == "all" else tuple(args.presets.split(","))
    unknown = [name for name in presets if name not in PRESETS]
    if unknown:
        parser.error(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(PRESETS)} or 'all'")
    training_paths = GPU_TRAINING_PATHS if device.type == "cuda" else CPU_TRAINING_PATHS
    for flag, names in (("--training_paths", args.training_paths), ("--quality_path", args.quality_path)):
        unknown = [name for name in (names or "").split(",") if name and name not in training_paths]
        if unknown:  # (found before the first step, not after minutes of timing)
            parser.error(f"{flag}: no {device.type} training path {', '.join(map(repr, unknown))}; the "
                         f"{device.type} ones: {', '.join(training_paths)}")

    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or
               platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
               "load_average": [round(v, 2) for v in os.getloadavg()]}  # timings mean little on a busy machine
    print(f"machine: {machine}\n")
    results: dict = {"machine": machine, "quick": args.quick}
    if not args.skip_training:
        print("Training: full GAN step, median of interleaved timed steps after warm-up; speed-up = median of "
              "per-round ratios to the first row (the official loop); log-mel L1 = each path's generator vs the "
              "plain-trained one on the batch (same start)")
        print("| model | batch × samples | path | s/step | steps/s | samples/s | peak memory | vs official | "
              "log-mel L1 vs plain | finite losses |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        only = args.training_paths.split(",") if args.training_paths else None
        results["training"], results["training_quality"] = bench_training(
            device, args.quick, 0 if args.skip_timing else steps, only, args.quality_steps, args.quality_path)
        if args.profile:
            results["profile"] = profile_training(device, args.quick, Path(args.profile), only)
        print()
    if not args.skip_inference:
        print(f"Inference: ×real-time ({QUICK_SECONDS if args.quick else 10}-second utterances); official = weight "
              "norm folded, fp32, no_grad (cuDNN's default TF32 on a GPU); speed-up = median of per-round ratios to it")
        use_onnx = not args.no_onnx
        if use_onnx and not all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnxscript")):
            print("(no ONNX column: the export needs onnx and onnxscript, running it onnxruntime)")
            use_onnx = False
        elif use_onnx and device.type == "cuda":
            import onnxruntime
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                print("(no ONNX column: onnxruntime has no CUDA provider here; pip install onnxruntime-gpu)")
                use_onnx = False
        print("| model (weights, parameters, rate) | batch | path | official ×RT | this path ×RT | vs official | "
              "log-mel L1 vs exact fp32 |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        with tempfile.TemporaryDirectory() as onnx_dir:
            results["inference"] = bench_inference(device, args.quick, args.compile, rounds, checkpoints,
                                                   Path(onnx_dir) if use_onnx else None, args.wav, presets)
    results["inference_input"] = args.wav or "synthetic speech-like signal"
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    results["wall_s"] = time.perf_counter() - started
    print(f"\nprocess peak RSS: {results['peak_rss_gb']:.1f} GiB; bench wall time {results['wall_s']:.0f} s")
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_cli(main)
