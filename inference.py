"""Mel -> waveform with a trained HiFi-GAN generator (or the Griffin-Lim baseline), from every way in.

    python inference.py --checkpoint work_dir/hifigan --input mels/ --output_dir out/          # .npy mels
    python inference.py --checkpoint generator_v1 --input clip.wav metadata.csv --output_dir out/  # copy-synthesis
    python inference.py --checkpoint generator_v1 --taco_weights tacotron2_statedict.pt \\
        --text "Printing, in the only sense with which we are at present concerned." --output_dir out/
    python inference.py --vocoder griffin_lim --config v1 --input clip.wav --output_dir out/   # the baseline
    python inference.py --checkpoint work_dir/hifigan --export_onnx hifigan.onnx              # for ONNX Runtime
    python inference.py --checkpoint work_dir/hifigan --push_to_hub owner/name                # to the HF Hub

`--checkpoint` takes this repo's export (a folder with generator.safetensors + config.json: a run folder or a
checkpoint_<step> folder; or one on the Hugging Face Hub, hf://owner/name) or an official jik876 generator file
(generator_v1, g_02500000, ...). Every input
becomes `<output_dir>/<stem>.wav` (text: text_000.wav, ...), 16-bit at the model's sample rate.
The vocoding itself (chunking, batching, Griffin-Lim, ONNX, mels from wavs and text) lives in vocoding.py.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch
from tqdm import tqdm

import hub
from model import HifiGanConfig, channels_last, resolve_config
from tacotron2 import load_tacotron2
from tacotron2.teacher_forcing import text_to_mel
from utils import (
    UserError,
    pick_device,
    read_manifest,
    run_cli,
    save_audio,
    unique_stems,
)
from vocoding import (
    GraphedGenerator,
    export_onnx,
    generate,
    griffin_lim,
    hop_of,
    load_mel,
    load_vocoder,
    mel_from_wav,
    onnx_session,
    silence_level,
    vocode_batch,
    vocode_onnx,
)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    jobs = []
    for path in unique_stems(paths, ".wav"):  # every input becomes <output_dir>/<stem>.wav
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
    return jobs


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless it has none or its help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Vocode mels, audio (copy-synthesis) or text with HiFi-GAN.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--checkpoint", help="generator export folder (generator.safetensors + config.json) "
                                             "or an official jik876 generator file")
    parser.add_argument("--config", help="a preset (v1|v2|v3|16khz|24khz|44khz|48khz) or a config.json: overrides "
                                         "the checkpoint's (official files carry none); for griffin_lim, the mel "
                                         "parameters (v1 when not given)")
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
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto: float16 on a GPU, run channels-last (log-mel L1 0.014 to float32 with the official "
                             "V2 weights on LJSpeech; 1.5-2.1x the official inference on an H200, see the README's "
                             "Speed), float32 on the CPU (bfloat16 costs quality there)")
    parser.add_argument("--cuda_graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="on a GPU, replay the generator from CUDA graphs: batches of --batch_size rows and "
                             "lengths rounded up to 64 frames (the padded tails vocoded again, exactly), a shape "
                             "captured the second time it comes; pays most at small batches; not with --compile")
    parser.add_argument("--compile", action="store_true", help="torch.compile the generator (exact; worth it for "
                        "many or long inputs: the first one waits for the compiler)")
    parser.add_argument("--seed", type=int, default=1234, help="Tacotron2's prenet dropout stays on at inference")
    parser.add_argument("--export_onnx", metavar="PATH", help="write the --checkpoint generator (weight norm folded, "
                        "dynamic batch and frames) as an ONNX model to PATH, check it against PyTorch, and exit")
    parser.add_argument("--onnx_opset", type=int, help="ONNX opset for --export_onnx (default: the exporter's)")
    parser.add_argument("--push_to_hub", metavar="OWNER/NAME", help="upload the --checkpoint export (a run or "
                        "checkpoint folder) to this Hugging Face Hub model repo with a model card, and exit; load it "
                        "back with --checkpoint hf://OWNER/NAME")
    parser.add_argument("--private", action="store_true", help="--push_to_hub: create the repo private")
    args = parser.parse_args(argv)
    has_source = bool(args.input or args.text or args.text_file)
    if args.export_onnx or args.push_to_hub:
        flag = "--export_onnx" if args.export_onnx else "--push_to_hub"
        if has_source or args.output_dir or (args.export_onnx and args.push_to_hub):
            parser.error(f"{flag} exports and exits: give it --checkpoint (and --config), "
                         "not --input/--text/--text_file/--output_dir or the other export")
    elif not has_source:
        parser.error("one of the arguments --input --text --text_file is required")
    elif not args.output_dir:
        parser.error("the following arguments are required: --output_dir")
    return args


def export(args: argparse.Namespace) -> None:
    """--export_onnx: write the model, then run it and PyTorch on the same random mel and print the difference."""
    if not args.checkpoint:
        raise UserError("--export_onnx needs --checkpoint: the generator to export")
    generator = load_vocoder(args.checkpoint, args.config)
    path = export_onnx(generator, args.export_onnx, args.onnx_opset)
    # The check runs where the model will: onnxruntime's CUDA provider for --device cuda (which torch need not see).
    device = pick_device().type if args.device == "auto" else args.device
    session = onnx_session(path, device=device)
    mel = torch.randn(2, generator.config.num_mels, 37, generator=torch.Generator().manual_seed(0)) + silence_level(
        generator.config) / 2  # arbitrary, but with a batch and a length other than the exported example's
    with torch.inference_mode():
        expected = generate(generator, mel)
    difference = (vocode_onnx(session, mel) - expected).abs().max().item()
    print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB; mel [batch, {generator.config.num_mels}, "
          f"frames] -> audio [batch, 1, frames * {hop_of(generator)}]); max abs difference from PyTorch on a random "
          f"mel [2, {generator.config.num_mels}, 37]: {difference:.2e}")


def push(args: argparse.Namespace) -> None:
    """--push_to_hub: the export folder as it is (weights, config.json) plus a model card."""
    if not args.checkpoint or not Path(args.checkpoint).is_dir():
        raise UserError(f"--push_to_hub needs --checkpoint with an export folder (a run or checkpoint_<step> folder), "
                        f"got {args.checkpoint!r}")
    load_vocoder(args.checkpoint)  # refuse what would not load back
    print(f"pushed {args.checkpoint} to {hub.push(args.checkpoint, args.push_to_hub, private=args.private)}")


def run(args: argparse.Namespace) -> None:
    if args.export_onnx:
        export(args)
        return
    if args.push_to_hub:
        push(args)
        return
    device = pick_device(args.device).type
    if args.dtype == "float16" and device != "cuda":
        raise UserError("--dtype float16 runs only on CUDA; on the CPU use bfloat16 or float32")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.max_chunk_frames is not None and args.max_chunk_frames < 16:
        raise UserError(f"--max_chunk_frames must be at least 16 (the chunk overlap), got {args.max_chunk_frames}")
    if (args.text or args.text_file) and not args.taco_weights:
        raise UserError("--text/--text_file need --taco_weights: a Tacotron2 checkpoint (NVIDIA's "
                        "tacotron2_statedict.pt or a save_tacotron2 folder)")
    dtype = DTYPES[("float16" if device == "cuda" else "float32") if args.dtype == "auto" else args.dtype]

    generator, how = None, str(dtype).removeprefix("torch.")
    if args.vocoder == "hifigan":
        if not args.checkpoint:
            raise UserError("--vocoder hifigan needs --checkpoint (or use --vocoder griffin_lim)")
        generator = load_vocoder(args.checkpoint, args.config, device, dtype)
        if device == "cuda" and dtype != torch.float32:
            channels_last(generator)  # cuDNN's half-precision kernels are NHWC: no transposes around each conv
            how += ", channels-last"
        config = generator.config
        if args.compile:
            # Same numbers, fused kernels; the first input compiles (seconds to minutes), so it pays off on long
            # jobs. dynamic=True: one compile for every input length rather than one per length.
            generator = torch.compile(generator, dynamic=True)
            how += ", torch.compile"
        elif device == "cuda" and args.cuda_graphs:
            # The host launches each call's ~200 kernels in one go: a few fixed shapes, one graph each.
            generator = GraphedGenerator(generator, args.batch_size)
            how += ", CUDA graphs"
    else:
        config = resolve_config(args.config or "v1")
        device, how = "cpu", "float32"  # griffin_lim runs on the CPU in float32
    jobs = collect_jobs(args, config)
    tacotron = load_tacotron2(args.taco_weights).to(device) if jobs[0].kind == "text" else None
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
                    mels.append(text_to_mel(tacotron, job.source, config.mel, args.max_decoder_steps)[0])
            tick = time.perf_counter()
            if generator is not None:
                audios = vocode_batch(generator, mels, args.max_chunk_frames, batch_size=args.batch_size)
            else:
                audios = [griffin_lim(mel, config, args.griffin_lim_iters) for mel in mels]
            vocoder_seconds += time.perf_counter() - tick
            for job, audio in zip(batch, audios):
                save_audio(output_dir / f"{job.name}.wav", audio, config.sampling_rate)
                audio_seconds += len(audio) / config.sampling_rate
            progress.update(len(batch))
    total_seconds = time.perf_counter() - started
    # RTF as ESPnet and ParallelWaveGAN print it (compute / audio, lower is better), and its inverse, × real time.
    print(f"wrote {len(jobs)} file(s) to {output_dir}: {audio_seconds:.1f} s of audio in {total_seconds:.2f} s, "
          f"RTF {total_seconds / max(audio_seconds, 1e-9):.4f} = {audio_seconds / max(total_seconds, 1e-9):.1f}x "
          f"real time (vocoder alone: RTF {vocoder_seconds / max(audio_seconds, 1e-9):.4f} = "
          f"{audio_seconds / max(vocoder_seconds, 1e-9):.1f}x) on {device}, {how}, "
          f"{torch.get_num_threads()} CPU thread(s)")


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
