"""Teacher-forced Tacotron2 mels for finetuning HiFi-GAN on what Tacotron2 really outputs (DESIGN.md §4).

    python save_taco_mels.py --path_to_manifest data/splits/train.csv data/splits/test.csv \
        --path_to_save data/taco_mels --taco_weights work_dir/tacotron2/checkpoint_50000
    accelerate launch --num_processes 4 save_taco_mels.py ...      # the clips are split across the processes

For each clip: its ground-truth mel goes into the Tacotron2 decoder as the previous-frame input (teacher forcing),
and the post-net mel comes out, frame for frame. It is written as `<path_to_save>/<wav stem>.npy`, float32
[num_mels, frames] with frames == len(audio) // hop_size, the frames of the clip's ground-truth mel (DESIGN.md §1),
in the vocoder's --mel_scale. `train.py --finetune --path_to_saved_mels DIR` reads them.

--taco_weights: a checkpoint folder of tacotron2/train.py, a save_tacotron2 export, or NVIDIA's
tacotron2_statedict.pt. The mel parameters come from the checkpoint's config.json ("audio"); NVIDIA's file has none
and uses DESIGN.md §1's defaults (22050 Hz, 80 mels, n_fft 1024, hop 256, fmax 8000, natural log), as here.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from tacotron2 import Tacotron2, load_tacotron2, text_to_sequence
from tacotron2.model import padding_mask
from tacotron2.train import collate, stored_audio
from utils import UserError, db_mel_to_log_mel, load_audio, log_mel_to_db_mel, mel_spectrogram, read_manifest, run_cli

# DESIGN.md §1's mel: the official HiFi-GAN's and NVIDIA's Tacotron2's.
DEFAULT_AUDIO = dict(sampling_rate=22050, num_mels=80, n_fft=1024, window_size=1024, hop_size=256, fmin=0.0,
                     fmax=8000.0, mel_scale="log", min_db=-100.0, max_scaled_abs=4.0)
MEL_FLAGS = ("sampling_rate", "num_mels", "n_fft", "window_size", "hop_size", "fmin", "fmax")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--path_to_manifest", nargs="+", required=True, help="one or more manifests (e.g. train and test)")
    add("--path_to_save", required=True, help="folder for the <wav stem>.npy files")
    add("--taco_weights", required=True, help="Tacotron2 checkpoint folder, export, or NVIDIA's .pt")
    add("--batch_size", type=int, default=16)
    add("--overwrite", action="store_true", help="redo clips whose .npy already exists (default: skip them)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--seed", type=int, default=1234, help="seeds the prenet dropout, which stays on (see teacher_forced_mels)")
    # Mel parameters: default to the checkpoint's, which the Tacotron2 was trained on.
    add("--sampling_rate", type=int, default=None)
    add("--num_mels", type=int, default=None)
    add("--n_fft", type=int, default=None)
    add("--window_size", type=int, default=None)
    add("--hop_size", type=int, default=None)
    add("--fmin", type=float, default=None)
    add("--fmax", type=float, default=None)
    add("--mel_scale", choices=["log", "db"], default="log",
        help="the scale the vocoder reads (the Tacotron2's own is converted to it): log (HiFi-GAN's) or db")
    add("--min_db", type=float, default=None, help="for --mel_scale db (default: the checkpoint's, or -100)")
    add("--max_scaled_abs", type=float, default=None, help="for --mel_scale db (default: the checkpoint's, or 4)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    return args


def resolve_audio(args: argparse.Namespace, stored: dict) -> tuple[dict, dict]:
    """(the mel the Tacotron2 reads and writes, the mel written out) as utils.mel_spectrogram keyword arguments."""
    taco = {**DEFAULT_AUDIO, **{k: v for k, v in stored.items() if k in DEFAULT_AUDIO}}
    for name in MEL_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        if name in stored and stored[name] != value:
            # Teacher forcing with a mel the model was not trained on gives meaningless output; allowed, but said.
            warnings.warn(f"--{name} {value} differs from the {stored[name]} this Tacotron2 was trained with",
                          stacklevel=2)
        taco[name] = value
    out = {**taco, "mel_scale": args.mel_scale,
           "min_db": taco["min_db"] if args.min_db is None else args.min_db,
           "max_scaled_abs": taco["max_scaled_abs"] if args.max_scaled_abs is None else args.max_scaled_abs}
    return taco, out


def convert_scale(mel: torch.Tensor, source: dict, target: dict) -> torch.Tensor:
    """A mel in `source`'s scale (log or db) re-expressed in `target`'s (the two are affine images of each other)."""
    if source["mel_scale"] == "db":
        mel = db_mel_to_log_mel(mel, source["min_db"], source["max_scaled_abs"])
    if target["mel_scale"] == "db":
        mel = log_mel_to_db_mel(mel, target["min_db"], target["max_scaled_abs"])
    return mel


@torch.no_grad()
def teacher_forced_mels(model: Tacotron2, tokens: list[torch.Tensor], mels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Post-net mels [n_mel, frames] of a batch of clips, each exactly as long as its ground-truth mel.

    `model` is in eval mode: batch norm uses its running statistics and the encoder, attention, decoder and
    post-net dropouts are off. The prenet's dropout stays on: NVIDIA's Prenet calls `F.dropout(..., training=True)`
    whatever the mode, so the ground-truth-aligned (GTA) scripts built on NVIDIA's model, which call `model.eval()`
    and then the teacher-forced forward, keep it; so does this. The decoder then sees its inputs through
    the same dropout as in training and at inference, so the mels resemble what free-running synthesis produces.
    """
    # Tacotron2.forward, taken apart so that no clip depends on what it is batched with: the encoder's convolutions
    # would read the pad symbol's embedding past a shorter transcript's end, and the post-net's the padding past a
    # shorter clip's last frame. Both are cheap and run per clip; the decoder (the step-by-step loop, the cost) runs
    # batched, its attention masked to each transcript, so every clip comes out as if it had been alone.
    device = model.embedding.weight.device
    memory = pad_sequence([model.encode(t[None].to(device))[0] for t in tokens], batch_first=True)
    text_lengths = torch.tensor([len(t) for t in tokens], device=device)
    _, _, mel_padded, _, output_lengths = collate(list(zip(tokens, mels)))
    mel_decoder, _, _ = model.decoder(memory, mel_padded.to(device), padding_mask(text_lengths, memory.shape[1]))
    outputs = []
    for i, frames in enumerate(output_lengths.tolist()):
        clip = mel_decoder[i:i + 1, :, :frames]
        outputs.append((clip + model.postnet(clip))[0])
    return outputs


def write_npy(path: Path, array: np.ndarray) -> None:
    """Write under a temporary name, then rename: a killed run never leaves a truncated .npy that would be skipped."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:  # a file handle, or np.save would append ".npy" to the temporary name
        np.save(handle, array)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Write the mels; returns the exit code: 1 when any clip failed, 0 otherwise."""
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.device == "cpu")
    if args.device == "cuda" and accelerator.device.type != "cuda":
        raise UserError("--device cuda, but torch sees no CUDA device here; use --device auto or cpu")
    model = load_tacotron2(args.taco_weights).to(accelerator.device)
    taco_audio, out_audio = resolve_audio(args, stored_audio(args.taco_weights))
    if taco_audio["num_mels"] != model.config.n_mel_channels:
        raise UserError(f"{args.taco_weights} predicts {model.config.n_mel_channels} mel channels, but the mel "
                        f"settings say {taco_audio['num_mels']}; drop --num_mels or fix it")

    # Every clip of every manifest, each once; the output name is the wav's stem, so two wavs must not share one.
    clips, by_stem = [], {}
    for manifest in args.path_to_manifest:
        for row in read_manifest(manifest, check_files=False):  # a missing wav fails its row, not the run
            stem = Path(row.audio_path).stem
            if stem in by_stem:
                if Path(by_stem[stem][1].audio_path).resolve() == Path(row.audio_path).resolve():
                    continue
                raise UserError(f"{manifest}, line {row.line}: {row.audio_path} and {by_stem[stem][1].audio_path} "
                                f"({by_stem[stem][0]}, line {by_stem[stem][1].line}) would both be saved as "
                                f"{stem}.npy; rename one")
            by_stem[stem] = (manifest, row)
            clips.append((manifest, row))
    out_dir = Path(args.path_to_save)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.print(f"{len(clips)} clips -> {out_dir} ({model.config.n_mel_channels} mels, hop "
                      f"{taco_audio['hop_size']}, Tacotron2 mel {taco_audio['mel_scale']}, written "
                      f"{out_audio['mel_scale']}) on {accelerator.num_processes} process(es), {accelerator.device}")
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

        todo = []
        for manifest, row in mine:
            if (out_dir / f"{Path(row.audio_path).stem}.npy").exists() and not args.overwrite:
                skipped += 1
                progress.update(1)
                continue
            tokens = text_to_sequence(row.transcript) if row.transcript else []
            if not tokens:
                fail(manifest, row, f"the transcript {row.transcript!r} has no symbol Tacotron2 knows once cleaned")
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
                    audio = torch.from_numpy(load_audio(row.audio_path, taco_audio["sampling_rate"]))
                except UserError as error:
                    fail(manifest, row, str(error))
                    continue
                if len(audio) < taco_audio["hop_size"]:
                    fail(manifest, row, f"shorter than one hop ({len(audio)} samples)")
                    continue
                # Exactly len(audio) // hop_size frames (DESIGN.md §1), and teacher forcing keeps the count.
                batch.append((manifest, row, tokens, mel_spectrogram(audio, **taco_audio)))
            if not batch:
                continue
            mels = teacher_forced_mels(model, [item[2] for item in batch], [item[3] for item in batch])
            for (_, row, _, _), mel in zip(batch, mels):
                mel = convert_scale(mel.float(), taco_audio, out_audio)
                write_npy(out_dir / f"{Path(row.audio_path).stem}.npy", mel.cpu().numpy().astype(np.float32))
                wrote += 1
                progress.update(1)
        progress.close()

    counts = gather_object([(wrote, skipped, len(failures))])
    wrote, skipped, failed = (sum(column) for column in zip(*counts))
    accelerator.print(f"wrote {wrote}, skipped {skipped}, failed {failed} ({out_dir})")
    if failed:
        accelerator.print(f"{failed} clip(s) failed (named above); fix them and run again: written clips are skipped")
    # Leave the process group before exiting: a rank that exits inside it is aborted (SIGABRT) by gloo's threads.
    accelerator.end_training()
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
