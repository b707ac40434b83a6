"""Benchmark the plain fp32 eager path against the fast paths, in one run, and say what each costs in quality.

    python bench.py [--device cpu|cuda|auto] [--quick] [--compile] [--json bench_results.json]

Training: steps/s and audio samples/s of the full GAN step (generator + both discriminators, forward and
backward, both optimisers: train.train_step itself) for V1, plain fp32 against bf16 autocast (+ TF32 and
fused AdamW on a GPU) and, with --compile, torch.compile. Inference: ×real-time of V1/V2/V3 on a 10-second
utterance at batch 1 and at a throughput batch: plain (weight norm live, fp32, no_grad) against weight norm
folded + inference_mode in fp32, bf16 (and fp16 on a GPU), torch.compile, and ONNX Runtime when installed.
Quality cost: log-mel L1 between each fast output and the plain output for the same weights and input.

Warm-up runs are excluded; each measurement is the median of several rounds, and every round times the
plain path and the fast path back to back, so a speed-up is the median of per-round ratios and stays fair
on a noisy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from model import PRESETS, Generator, MultiPeriodDiscriminator, MultiScaleDiscriminator, build_generator, load_generator
from utils import mel_spectrogram


def speechlike_audio(seconds: float, sampling_rate: int = 22050, batch: int = 1) -> torch.Tensor:
    """A gliding harmonic tone with syllable-like bursts: its mel looks like speech to a vocoder."""
    t = torch.arange(int(seconds * sampling_rate)) / sampling_rate
    clips = []
    for i in range(batch):
        f0 = (110 + 20 * i) * (1 + 0.15 * torch.sin(2 * math.pi * 0.7 * t))
        phase = 2 * math.pi * torch.cumsum(f0, 0) / sampling_rate
        voiced = sum(torch.sin(k * phase) / k for k in range(1, 20))
        envelope = torch.clamp(torch.sin(2 * math.pi * 3 * t + i), min=0) ** 0.5
        clips.append(0.5 * voiced * envelope / voiced.abs().max())
    return torch.stack(clips)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def paired_timings(plain: Callable, fast: dict[str, Callable], device: torch.device, rounds: int
                   ) -> tuple[float, dict[str, tuple[float, float]]]:
    """Median plain seconds, and per fast path (median seconds, median of per-round plain/fast ratios).

    Each round times the plain path, then every fast path: a ratio compares runs made moments apart.
    One warm-up run of each is excluded.
    """
    for fn in (plain, *fast.values()):
        fn()
    sync(device)

    def timed(fn: Callable) -> float:
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    plain_times, fast_times = [], {name: [] for name in fast}
    for _ in range(rounds):
        plain_times.append(timed(plain))
        for name, fn in fast.items():
            fast_times[name].append(timed(fn))
    return statistics.median(plain_times), {
        name: (statistics.median(times), statistics.median(p / f for p, f in zip(plain_times, times)))
        for name, times in fast_times.items()}


def log_mel_l1(audio: torch.Tensor, reference: torch.Tensor, config) -> float:
    kwargs = config.mel_kwargs()
    return torch.nn.functional.l1_loss(mel_spectrogram(audio.float().cpu().flatten(0, -2), **kwargs),
                                       mel_spectrogram(reference.float().cpu().flatten(0, -2), **kwargs)).item()


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------

def inference_variants(generator: Generator, device: torch.device, use_compile: bool) -> dict[str, Callable]:
    """name -> function(mel) -> audio, for every fast path that this device supports."""
    # A rebuilt copy, not copy.deepcopy: parametrized modules share a generated class, and folding a deep
    # copy's weight norm would strip the `weight` property from the original too.
    folded = Generator(generator.config)
    folded.load_state_dict(generator.state_dict())
    folded = folded.remove_weight_norm().to(device).eval()

    def fast(dtype: torch.dtype | None):
        def run(mel):
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                return folded(mel).float()
        return run

    variants = {"folded fp32": fast(None), "folded bf16": fast(torch.bfloat16)}
    if device.type == "cuda":
        variants["folded fp16"] = fast(torch.float16)
    if use_compile:
        compiled = torch.compile(folded)

        def run_compiled(mel):
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                return compiled(mel).float()
        variants["compiled bf16"] = run_compiled
    if device.type == "cpu":
        with contextlib.suppress(ImportError):
            import onnxruntime  # noqa: F401  (the column exists only where ONNX Runtime does)

            from inference import export_onnx, onnx_session
            path = Path("/tmp") / f"bench_{id(folded)}.onnx"
            export_onnx(folded, path)
            session = onnx_session(path)
            variants["onnx fp32"] = lambda mel: torch.from_numpy(session.run(None, {"mel": mel.numpy()})[0])
    return variants


def bench_inference(device: torch.device, quick: bool, use_compile: bool, rounds: int,
                    checkpoints: dict[str, str]) -> list[dict]:
    rows = []
    seconds = 1.0 if quick else 10.0
    throughput_batch = (16 if device.type == "cuda" else 4) if not quick else 2
    for preset in (("v1", "v2") if quick else ("v1", "v2", "v3")):
        if preset in checkpoints:
            generator = load_generator(checkpoints[preset]).to(device)
            weights = "trained"
        else:
            torch.manual_seed(0)
            generator = build_generator(preset).to(device).eval()
            weights = "random"
        config = generator.config
        for batch in ((1,) if quick and preset == "v1" else (1, throughput_batch)):
            audio = speechlike_audio(seconds, config.sampling_rate, batch).to(device)
            mel = mel_spectrogram(audio, **config.mel_kwargs())

            def plain(generator=generator, mel=mel):
                with torch.no_grad():
                    return generator(mel)
            reference = plain()
            variants = inference_variants(generator, device, use_compile)
            compile_seconds = {}
            for name, fast in variants.items():
                if name.startswith("compiled"):  # the first call compiles: time it apart
                    start = time.perf_counter()
                    fast(mel)
                    compile_seconds[name] = time.perf_counter() - start
            plain_s, timings = paired_timings(plain, {name: (lambda fast=fast, mel=mel: fast(mel))
                                                      for name, fast in variants.items()}, device, rounds)
            audio_seconds = batch * mel.shape[-1] * config.hop_size / config.sampling_rate
            for name, (fast_s, ratio) in timings.items():
                rows.append({"model": preset, "weights": weights, "batch": batch, "path": name,
                             "plain_xrt": audio_seconds / plain_s, "fast_xrt": audio_seconds / fast_s,
                             "speedup": ratio, "compile_s": compile_seconds.get(name),
                             "log_mel_l1_vs_plain": log_mel_l1(variants[name](mel), reference, config)})
                print(format_inference_row(rows[-1]), flush=True)
    return rows


def format_inference_row(row: dict) -> str:
    compile_note = f"  (compile {row['compile_s']:.0f} s)" if row["compile_s"] else ""
    return (f"| {row['model']} ({row['weights']}) | {row['batch']} | {row['path']} | {row['plain_xrt']:.1f}× | "
            f"{row['fast_xrt']:.1f}× | **{row['speedup']:.2f}×** | {row['log_mel_l1_vs_plain']:.4f} |{compile_note}")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def training_run(preset: str, device: torch.device, batch: int, segment: int, steps: int, mixed_precision: str,
                 fast_optim: bool, use_compile: bool) -> dict:
    """Time `steps` of train.train_step after 2 warm-up steps, in a fresh Accelerator of this precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    import train
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    torch.manual_seed(0)
    config = PRESETS[preset]
    generator, mpd, msd = Generator(config), MultiPeriodDiscriminator(config.mpd_periods), MultiScaleDiscriminator()
    fused = {"fused": True} if fast_optim and device.type == "cuda" else {}
    optim_g = torch.optim.AdamW(generator.parameters(), 2e-4, betas=(0.8, 0.99), **fused)
    optim_d = torch.optim.AdamW([*mpd.parameters(), *msd.parameters()], 2e-4, betas=(0.8, 0.99), **fused)
    generator, mpd, msd, optim_g, optim_d = accelerator.prepare(generator, mpd, msd, optim_g, optim_d)
    if use_compile:
        generator, mpd, msd = torch.compile(generator), torch.compile(mpd), torch.compile(msd)
    audio = speechlike_audio(segment / config.sampling_rate, config.sampling_rate, batch).to(device)
    mel = mel_spectrogram(audio, **config.mel_kwargs())
    loss_mel = mel_spectrogram(audio, **config.mel_kwargs(for_loss=True))
    kwargs = config.mel_kwargs(for_loss=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    start = time.perf_counter()
    times = []
    for step in range(steps + 2):
        sync(device)
        step_start = time.perf_counter()
        out = train.train_step(accelerator, generator, mpd, msd, optim_g, optim_d, mel, audio, loss_mel, kwargs)
        sync(device)
        if step == 0:
            first_step = time.perf_counter() - start
        if step >= 2:
            times.append(time.perf_counter() - step_start)
        losses.append(float(out["loss_generator"]))
    seconds = statistics.median(times)
    return {"seconds_per_step": seconds, "steps_per_s": 1 / seconds, "samples_per_s": batch * segment / seconds,
            "first_step_s": first_step, "all_finite": all(math.isfinite(v) for v in losses),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None}


def bench_training(device: torch.device, quick: bool, use_compile: bool, steps: int) -> list[dict]:
    preset, batch, segment = ("v2", 1, 8192) if quick else ("v1", 16 if device.type == "cuda" else 2, 8192)
    variants = [("plain fp32", "no", False, False), ("fast bf16", "bf16", True, False)]
    if use_compile:
        variants.append(("fast bf16 + compile", "bf16", True, True))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name, precision, fast_optim, compiled in variants:
        if device.type == "cuda":  # TF32 is part of the fast path only
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast_optim
        result = training_run(preset, device, batch, segment, steps, precision, fast_optim, compiled)
        rows.append({"model": preset, "batch": batch, "segment": segment, "path": name, **result})
        memory = f"{result['peak_memory_gb']:.1f} GiB" if result["peak_memory_gb"] else "n/a (CPU)"
        print(f"| {preset} | {batch}×{segment} | {name} | {result['seconds_per_step']:.3f} | "
              f"{result['steps_per_s']:.3f} | {result['samples_per_s']:.0f} | {memory} | "
              f"{'yes' if result['all_finite'] else 'NO'} |", flush=True)
    for row in rows:
        row["speedup_vs_plain"] = rows[0]["seconds_per_step"] / row["seconds_per_step"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small sizes and V1/V2 only: under a minute on a CPU")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (cold compiles take minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement")
    parser.add_argument("--train_steps", type=int, default=None, help="timed training steps per path")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="PRESET=PATH",
                        help="trained weights for a preset, e.g. v2=generator_v2 (default: random weights)")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--json", default="bench_results.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.train_steps or (2 if args.quick else 5)
    checkpoints = dict(spec.split("=", 1) for spec in args.checkpoint)

    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or
               platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0]}
    print(f"machine: {machine}\n")
    results: dict = {"machine": machine, "quick": args.quick}
    if not args.skip_training:
        print("Training: full GAN step (train.train_step), median of timed steps after 2 warm-up steps")
        print("| model | batch × samples | path | s/step | steps/s | samples/s | peak memory | finite losses |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        results["training"] = bench_training(device, args.quick, args.compile, steps)
        for row in results["training"][1:]:
            print(f"{row['path']}: {row['speedup_vs_plain']:.2f}× the plain fp32 step")
        print()
    print(f"Inference: ×real-time ({'1' if args.quick else '10'}-second utterances), plain = weight norm live, "
          "fp32, no_grad; speed-up = median of per-round ratios")
    print("| model (weights) | batch | fast path | plain ×RT | fast ×RT | speed-up | log-mel L1 vs plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    results["inference"] = bench_inference(device, args.quick, args.compile, rounds, checkpoints)
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"\nprocess peak RSS: {results['peak_rss_gb']:.1f} GiB")
    Path(args.json).write_text(json.dumps(results, indent=2, default=lambda v: None if v is None else float(v)))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
