"""Teacher-forced Tacotron2 mels for finetuning HiFi-GAN on what Tacotron2 really outputs (docs/design.md §4).

    python save_taco_mels.py --path_to_manifest data/splits/train.csv data/splits/test.csv \\
        --path_to_save data/taco_mels --taco_weights work_dir/tacotron2/checkpoint_50000
    accelerate launch --num_processes 4 save_taco_mels.py ...      # the clips are split across the processes

For each clip: its ground-truth mel goes into the Tacotron2 decoder as the previous-frame input (teacher forcing),
and the post-net mel comes out, frame for frame. It is written as `<path_to_save>/<wav stem>.npy`, float32
[num_mels, frames] with frames == len(audio) // hop_size, the frames of the clip's ground-truth mel (docs/design.md §1),
in the vocoder's --mel_scale. `train.py --finetune --path_to_saved_mels DIR` reads them.

Each clip is read and framed the way the Tacotron2's training data was (tacotron2/teacher_forcing.py): NVIDIA's
tacotron2_statedict.pt at the recorded level with centred STFT frames; a checkpoint folder or export of
train_tacotron2.py with the settings in its config.json ("audio"). `DIR/taco_mels.json` records the level and the
frame offset of the mels, and finetuning reads its target audio the same way, so mel and audio line up.

Ctrl-C or SIGTERM stops it at once (the file being written is finished first); the same command again continues:
clips whose .npy exists are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from dataset import check_saved_mels_info, write_saved_mels_info
from tacotron2 import load_tacotron2, text_to_sequence
from tacotron2.teacher_forcing import for_vocoder, teacher_forced_mels
from training import Stopped, StopSignal
from utils import (
    HelpFormatter,
    MelConfig,
    UserError,
    add_config_flags,
    config_overrides,
    pick_device,
    read_manifest,
    run_cli,
    unique_stems,
)

# The flags that choose the scale written out, not the Tacotron2's own.
OUTPUT_SCALE = ("mel_scale", "min_db", "max_scaled_abs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--path_to_manifest", nargs="+", required=True, help="one or more manifests (e.g. train and test)")
    add("--path_to_save", required=True, help="folder for the <wav stem>.npy files")
    add("--taco_weights", required=True, help="Tacotron2 checkpoint folder, export, or NVIDIA's .pt")
    add("--batch_size", type=int, default=16)
    add("--overwrite", action="store_true", help="redo clips whose .npy already exists (default: skip them)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--seed", type=int, default=1234, help="seeds the prenet dropout, which stays on (see teacher_forced_mels)")
    add("--mel_scale", choices=["log", "db"], default="log",
        help="the scale the vocoder reads (the Tacotron2's own is converted to it): log (HiFi-GAN's) or db")
    add("--min_db", type=float, default=None, help="for --mel_scale db (default: the checkpoint's, or -100)")
    add("--max_scaled_abs", type=float, default=None, help="for --mel_scale db (default: the checkpoint's, or 4)")
    # The Tacotron2's own mel settings come from its checkpoint; a flag overrides one (rarely what one wants).
    add_config_flags(parser, MelConfig, "the Tacotron2's mel (default: what it was trained with)", skip=OUTPUT_SCALE)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    return args


def resolve_mels(args: argparse.Namespace, trained: MelConfig) -> tuple[MelConfig, MelConfig]:
    """(the mel the Tacotron2 is fed and writes, the mel written out: the same but on --mel_scale)."""
    overrides = config_overrides(args, MelConfig, skip=OUTPUT_SCALE)
    for name, value in overrides.items():
        if getattr(trained, name) != value:
            # Teacher forcing with a mel the model was not trained on gives meaningless output; allowed, but said.
            warnings.warn(f"--{name} {value} differs from the {getattr(trained, name)} this Tacotron2 was trained "
                          "with", stacklevel=2)
    taco = dataclasses.replace(trained, **overrides)
    scale = {"mel_scale": args.mel_scale, "min_db": args.min_db, "max_scaled_abs": args.max_scaled_abs}
    out = dataclasses.replace(taco, **{key: value for key, value in scale.items() if value is not None})
    return taco, out


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_npy(path: Path, array: np.ndarray) -> None:
    """Write under a temporary name, then rename: a killed run never leaves a truncated .npy that would be skipped."""
    tmp = temporary_name(path)
    with open(tmp, "wb") as handle:  # a file handle, or np.save would append ".npy" to the temporary name
        np.save(handle, array)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Write the mels; returns the exit code: 1 when any clip failed, 0 otherwise."""
    args = parse_args(argv)
    accelerator = Accelerator(cpu=pick_device(args.device).type == "cpu")
    model = load_tacotron2(args.taco_weights).to(accelerator.device)
    taco_mel, out_mel = resolve_mels(args, model.mel)
    if taco_mel.num_mels != model.config.n_mel_channels:
        raise UserError(f"{args.taco_weights} predicts {model.config.n_mel_channels} mel channels, but the mel "
                        f"settings say {taco_mel.num_mels}; drop --num_mels or fix it")

    # Every clip of every manifest, each once; the output name is the wav's stem, so two wavs must not share one.
    # (a missing wav fails its row, not the run)
    clips = unique_stems(((manifest, row) for manifest in args.path_to_manifest
                          for row in read_manifest(manifest, check_files=False)), ".npy",
                         path=lambda clip: clip[1].audio_path,
                         label=lambda clip: f"{clip[1].audio_path} ({clip[0]}, line {clip[1].line})",
                         same_file_once=True)
    out_dir = Path(args.path_to_save)
    out_dir.mkdir(parents=True, exist_ok=True)
    # How finetuning must read the target audio of these mels; a folder holding mels made otherwise is refused
    # (unless --overwrite), since its old and new mels would need different audio.
    info = {"audio_peak": taco_mel.audio_peak, "frame_shift": taco_mel.frame_shift,
            "mel": {key: value for key, value in out_mel.kwargs().items() if key != "center"},
            "tacotron2": str(args.taco_weights)}
    check_saved_mels_info(out_dir, info, overwrite=args.overwrite)  # every process: any may have to stop
    # SIGINT/SIGTERM (Ctrl-C, `timeout`, a scheduler, the launcher): stop at once, the clips being computed are
    # redone by the next run; a .npy being written is finished first (and renamed: never half-written). Handled
    # from here to the end on every process (installed before the barrier: before any process starts writing).
    stop = StopSignal(announce="stopping; the next run continues from the clips written")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_saved_mels_info(out_dir, info)
        for leftover in out_dir.glob(temporary_name(Path("*.npy")).name):  # a killed run's unfinished write
            leftover.unlink()
    level = "as recorded" if info["audio_peak"] is None else f"peak-normalised to {info['audio_peak']}"
    frames = "centred STFT frames" if info["frame_shift"] else "the vocoder's STFT frames"
    accelerator.print(f"{len(clips)} clips -> {out_dir} ({model.config.n_mel_channels} mels, hop "
                      f"{taco_mel.hop_size}, Tacotron2 mel {taco_mel.mel_scale}, written "
                      f"{out_mel.mel_scale}; audio {level}, {frames}) on {accelerator.num_processes} "
                      f"process(es), {accelerator.device}")
    # Seeded per process: reruns give the same mels (the prenet dropout is random).
    torch.manual_seed(args.seed + accelerator.process_index)

    wrote, skipped, failures = 0, 0, []
    with accelerator.split_between_processes(clips) as mine:
        progress = tqdm(total=len(mine), desc="teacher-forced mels", disable=not accelerator.is_local_main_process,
                        dynamic_ncols=True)

        def fail(manifest: str, row, reason: str) -> None:
            failures.append(f"{manifest}, line {row.line} ({row.audio_path}): {reason}")
            progress.write(f"failed: {failures[-1]}", file=sys.stderr)
            progress.update(1)

        try:
            with stop.interrupting():
                todo = []
                for manifest, row in mine:
                    if (out_dir / f"{Path(row.audio_path).stem}.npy").exists() and not args.overwrite:
                        skipped += 1
                        progress.update(1)
                        continue
                    tokens = text_to_sequence(row.transcript) if row.transcript else []
                    if not tokens:
                        fail(manifest, row, f"the transcript {row.transcript!r} has no symbol Tacotron2 knows once "
                             "cleaned")
                        continue
                    try:
                        length = sf.info(row.audio_path).duration  # header only: enough to sort by
                    except Exception as error:  # soundfile raises several types for missing or corrupt files
                        fail(manifest, row, f"cannot read the audio ({error})")
                        continue
                    todo.append((length, manifest, row, torch.tensor(tokens)))
                # Longest first, so that each batch holds clips of similar length (little padding to decode).
                todo.sort(key=lambda item: item[0], reverse=True)

                for start in range(0, len(todo), args.batch_size):
                    batch = []
                    for _, manifest, row, tokens in todo[start:start + args.batch_size]:
                        try:
                            audio = torch.from_numpy(taco_mel.load(row.audio_path))
                        except UserError as error:
                            fail(manifest, row, str(error))
                            continue
                        if len(audio) < taco_mel.hop_size:
                            fail(manifest, row, f"shorter than one hop ({len(audio)} samples)")
                            continue
                        # The Tacotron2's own frames (NVIDIA's: one more than len // hop); teacher forcing keeps
                        # the count.
                        batch.append((manifest, row, tokens, taco_mel.mel(audio), len(audio)))
                    if not batch:
                        continue
                    mels = teacher_forced_mels(model, [item[2] for item in batch], [item[3] for item in batch])
                    for (_, row, _, _, num_samples), mel in zip(batch, mels):
                        mel = for_vocoder(mel, num_samples, taco_mel, out_mel)  # len(audio) // hop frames
                        with stop.protected():
                            write_npy(out_dir / f"{Path(row.audio_path).stem}.npy",
                                      mel.cpu().numpy().astype(np.float32))
                            wrote += 1
                            progress.update(1)
        except Stopped:
            pass
        progress.close()

    counts = gather_object([(wrote, skipped, len(failures), stop.received or "")])
    signals = sorted({received for *_, received in counts if received})
    wrote, skipped, failed = (sum(column) for column in list(zip(*counts))[:3])
    accelerator.print(f"wrote {wrote}, skipped {skipped}, failed {failed} ({out_dir})")
    left = len(clips) - wrote - skipped - failed
    if signals and left:
        accelerator.print(f"stopped by {' and '.join(signals)} with {left} clip(s) left; run the same command again "
                          "to continue (written clips are skipped)")
    if failed:
        accelerator.print(f"{failed} clip(s) failed (named above); fix them and run again: written clips are skipped")
    # Leave the process group before exiting: a rank that exits inside it is aborted (SIGABRT) by gloo's threads.
    accelerator.end_training()
    stop.restore()
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
