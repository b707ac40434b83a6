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

import torch

import metrics
from model import (
    PRESETS,
    Generator,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    build_generator,
    load_generator,
    train_step,
)
from utils import load_audio, mel_spectrogram

QUICK_SECONDS = 0.5  # --quick's utterance length


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

def inference_paths(generator: Generator, device: torch.device, use_compile: bool, onnx_dir: Path | None
                    ) -> dict[str, Callable]:
    """name -> function(mel) -> audio [B, 1, T], the plain path first, then every fast path this device has."""
    folded = generator.folded_copy().to(device)

    def plain(mel):
        with torch.no_grad():
            return generator(mel)

    def fast(dtype: torch.dtype | None, model: Callable = folded):
        def run(mel):
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                return model(mel).float()
        return run

    paths = {"plain fp32": plain, "folded fp32": fast(None), "folded bf16": fast(torch.bfloat16)}
    if device.type == "cuda":
        paths["folded fp16"] = fast(torch.float16)
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
        paths = inference_paths(generator, device, use_compile, onnx_dir)
        for batch in (1, throughput_batch):
            audio = recorded_audio(wav, seconds, config.sampling_rate, batch) if wav else \
                speechlike_audio(seconds, config.sampling_rate, batch)
            mel = mel_spectrogram(audio, **config.mel_kwargs())
            mel = mel.to(device)
            compile_s = None
            if use_compile:  # the first call compiles (and recompiles for a new shape): time it apart
                start = time.perf_counter()
                paths["compiled fp32"](mel)
                paths["compiled bf16"](mel)
                compile_s = time.perf_counter() - start
            outputs, timings = paired_timings({name: (lambda fn=fn, mel=mel: fn(mel)) for name, fn in paths.items()},
                                              device, rounds)
            audio_seconds = batch * mel.shape[-1] * config.hop_size / config.sampling_rate
            plain_s = timings["plain fp32"]["seconds"]
            for name in list(paths)[1:]:
                rows.append({"model": preset, "weights": weights, "parameters": parameters,
                             "sampling_rate": config.sampling_rate, "batch": batch, "audio_s": audio_seconds,
                             "path": name, "plain_xrt": audio_seconds / plain_s,
                             "fast_xrt": audio_seconds / timings[name]["seconds"], "speedup": timings[name]["speedup"],
                             "log_mel_l1_vs_plain": batch_log_mel_l1(outputs[name], outputs["plain fp32"], config),
                             "compile_s": compile_s if name.startswith("compiled") else None})
                print(format_inference_row(rows[-1]), flush=True)
    return rows


def format_inference_row(row: dict) -> str:
    compile_note = f" (compile {row['compile_s']:.0f} s)" if row["compile_s"] else ""
    return (f"| {row['model']} ({row['weights']}, {row['parameters'] / 1e6:.2f} M, {row['sampling_rate']} Hz) | "
            f"{row['batch']} | {row['path']}{compile_note} | "
            f"{row['plain_xrt']:.1f}× | {row['fast_xrt']:.1f}× | **{row['speedup']:.2f}×** | "
            f"{row['log_mel_l1_vs_plain']:.4f} |")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def bench_training(device: torch.device, quick: bool, use_compile: bool, steps: int) -> list[dict]:
    """model.train_step for the plain and fast setups, from the same initial weights, in interleaved rounds."""
    import dataclasses

    from accelerate import Accelerator
    if quick:  # V1's generator, discriminators 4× thinner, a short segment: the same step, smaller
        config, batch, segment = dataclasses.replace(PRESETS["v1"], discriminator_width_divisor=4), 1, 2048
    else:
        config, batch, segment = PRESETS["v1"], 16 if device.type == "cuda" else 2, 8192
    # One bf16 accelerator: a module it prepares runs its forward under bf16 autocast; the plain modules are
    # not prepared, so they run in fp32 eager (on one process prepare does nothing else to them).
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    audio = speechlike_audio(segment / config.sampling_rate, config.sampling_rate, batch).to(device)
    mel = mel_spectrogram(audio, **config.mel_kwargs())
    loss_mel = mel_spectrogram(audio, **config.mel_kwargs(for_loss=True))
    kwargs = config.mel_kwargs(for_loss=True)

    def setup(fast: bool, compiled: bool) -> tuple[Callable, Generator, list]:
        torch.manual_seed(0)  # every path starts from the same weights
        divisor = config.discriminator_width_divisor
        generator = Generator(config).to(device)
        mpd = MultiPeriodDiscriminator(config.mpd_periods, divisor).to(device)
        msd = MultiScaleDiscriminator(divisor).to(device)
        fused = {"fused": True} if fast and device.type == "cuda" else {}
        optim_g = torch.optim.AdamW(generator.parameters(), 2e-4, betas=(0.8, 0.99), **fused)
        optim_d = torch.optim.AdamW([*mpd.parameters(), *msd.parameters()], 2e-4, betas=(0.8, 0.99), **fused)
        if fast:
            generator, mpd, msd, optim_g, optim_d = accelerator.prepare(generator, mpd, msd, optim_g, optim_d)
        models = [generator, mpd, msd]
        if compiled:
            models = [torch.compile(m) for m in models]
        losses = []

        def step():
            if device.type == "cuda":  # TF32 belongs to the fast path only
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast
            out = train_step(accelerator, *models, optim_g, optim_d, mel, audio, loss_mel, kwargs)
            losses.append(float(out["loss_generator"]))
        return step, generator, losses

    setups = {"plain fp32": setup(False, False), "fast bf16": setup(True, False)}
    if use_compile:
        setups["fast bf16 + compile"] = setup(True, True)
    first_step_s = {}
    for name, (step, _, _) in setups.items():  # the first step (allocation, optimiser state, compilation)
        start = time.perf_counter()
        step()
        first_step_s[name] = time.perf_counter() - start
    _, timings = paired_timings({name: s[0] for name, s in setups.items()}, device, steps,
                                warmup=0 if quick else 1)

    def generate(generator: Generator) -> torch.Tensor:  # fp32, whatever the training precision was
        copy = Generator(config).to(device)
        copy.load_state_dict(generator.state_dict())
        with torch.no_grad():
            return copy(mel)

    reference = generate(setups["plain fp32"][1])
    rows = []
    for name, (_, generator, losses) in setups.items():
        seconds = timings[name]["seconds"]
        rows.append({"model": "v1", "batch": batch, "segment": segment,
                     "discriminator_width_divisor": config.discriminator_width_divisor, "path": name,
                     "seconds_per_step": seconds, "steps_per_s": 1 / seconds,
                     "samples_per_s": batch * segment / seconds,
                     "speedup_vs_plain": timings[name]["speedup"], "peak_memory_gb": timings[name]["peak_memory_gb"],
                     "first_step_s": first_step_s[name], "all_finite": all(map(math.isfinite, losses)),
                     "log_mel_l1_vs_plain": batch_log_mel_l1(generate(generator), reference, config)})
        print(format_training_row(rows[-1], device), flush=True)
    if device.type == "cuda":  # inference's fp32 paths are plain fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return rows


def format_training_row(row: dict, device: torch.device) -> str:
    memory = "n/a" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.2f} GiB"
    memory += "" if device.type == "cuda" else " RSS"
    return (f"| {row['model']} | {row['batch']}×{row['segment']} | {row['path']} | {row['seconds_per_step']:.3f} | "
            f"{row['steps_per_s']:.3f} | {row['samples_per_s']:.0f} | {memory} | **{row['speedup_vs_plain']:.2f}×** | "
            f"{row['log_mel_l1_vs_plain']:.4f} | {'yes' if row['all_finite'] else 'NO'} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="every column, small sizes: under a minute on a CPU")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (cold compiles take minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="timed inference rounds (default 5, quick 2)")
    parser.add_argument("--train_steps", type=int, default=None, help="timed training rounds (default 5, quick 2)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="PRESET=PATH",
                        help="trained weights for a preset, e.g. v2=generator_v2 (default: random weights)")
    parser.add_argument("--presets", default="v1,v2,v3",
                        help=f"inference presets, comma-separated, or 'all' ({','.join(PRESETS)})")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--wav", help="inference input: this recording, looped (default: a synthetic speech-like "
                        "signal); with --checkpoint, the quality column is then what a listener would hear")
    parser.add_argument("--no_onnx", action="store_true", help="skip the ONNX Runtime column")
    parser.add_argument("--output", "--json", default="bench_results.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.train_steps or (2 if args.quick else 5)
    checkpoints = dict(spec.split("=", 1) for spec in args.checkpoint)
    presets = tuple(PRESETS) if args.presets == "all" else tuple(args.presets.split(","))
    unknown = [name for name in presets if name not in PRESETS]
    if unknown:
        parser.error(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(PRESETS)} or 'all'")

    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or
               platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
               "load_average": [round(v, 2) for v in os.getloadavg()]}  # timings mean little on a busy machine
    print(f"machine: {machine}\n")
    results: dict = {"machine": machine, "quick": args.quick}
    if not args.skip_training:
        print("Training: full GAN step (train.train_step), median of interleaved timed steps after warm-up; "
              "log-mel L1 = fast-trained vs plain-trained generator on the batch (same start)")
        print("| model | batch × samples | path | s/step | steps/s | samples/s | peak memory | speed-up | "
              "log-mel L1 vs plain | finite losses |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        results["training"] = bench_training(device, args.quick, args.compile, steps)
        print()
    print(f"Inference: ×real-time ({QUICK_SECONDS if args.quick else 10}-second utterances), plain = weight norm live, "
          "fp32, no_grad; speed-up = median of per-round ratios")
    use_onnx = not args.no_onnx
    if use_onnx and not all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnxscript")):
        print("(no ONNX column: the export needs onnx and onnxscript, running it onnxruntime)")
        use_onnx = False
    elif use_onnx and device.type == "cuda":
        import onnxruntime
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            print("(no ONNX column: onnxruntime has no CUDA provider here; pip install onnxruntime-gpu)")
            use_onnx = False
    print("| model (weights, parameters, rate) | batch | fast path | plain ×RT | fast ×RT | speed-up | "
          "log-mel L1 vs plain |")
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
    main()
