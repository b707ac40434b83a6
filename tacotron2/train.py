"""Train Tacotron2 (text -> mel), the first half of the TTS pipeline whose second half is HiFi-GAN.

    accelerate launch tacotron2/train.py --experiment_name tacotron2 --working_directory work_dir \
        --path_to_train_manifest data/splits/train.csv --path_to_val_manifest data/splits/test.csv

The targets are `utils.mel_spectrogram` of each wav (DESIGN.md §1; `--mel_scale log` by default, the convention
of NVIDIA's Tacotron2 and the official HiFi-GAN), so a vocoder trained in this repo reads what this model writes.
Every `checkpoint_<step>` folder is also a ready inference folder (`tacotron2.safetensors` + `config.json` with the
mel parameters), so `load_tacotron2(folder)` and `save_taco_mels.py --taco_weights folder` take it as it is.
Reads top to bottom like ../train.py: flags -> config -> data -> model -> optimiser -> resume -> loop -> checkpoints.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

if not __package__:
    # Run as a script (which is what `accelerate launch tacotron2/train.py` does), Python puts tacotron2/ first on
    # sys.path, where its model.py and this train.py would shadow the repo's own: put the repo root there instead.
    _PACKAGE_DIR = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _PACKAGE_DIR]
    sys.path.insert(0, str(_PACKAGE_DIR.parent))

from inference import griffin_lim
from model import HifiGanConfig
from tacotron2 import Tacotron2, Tacotron2Config, load_tacotron2, save_tacotron2, symbols, text_to_sequence
from tacotron2.data import collate
from tacotron2.model import padding_mask
from tacotron2.teacher_forcing import load_clip, mel_kwargs, mel_settings
from train import (
    StopSignal,
    check_launch,
    resume,
    save_checkpoint,
    setup_trackers,
    start_trackers,
)
from utils import UserError, check_audio_files, mel_spectrogram, read_manifest, run_cli, save_audio

# ---------------------------------------------------------------------------------------------
# Flags (the seed tutorial's train_taco.sh names, mapped onto NVIDIA's Tacotron2Config in build_config)
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    # Run and data
    add("--experiment_name", required=True, help="run folder name under --working_directory")
    add("--run_name", default=None, help="name of the run in the trackers (default: the experiment name)")
    add("--working_directory", required=True, help="where checkpoints and logs go")
    add("--save_audio_gen", nargs="?", const="", default=None, metavar="DIR",
        help="at each validation, also write the mel/alignment plots and Griffin-Lim audio of the predicted mels "
             "to DIR (the flag alone: <run>/generated) and log the audio to the trackers")
    add("--path_to_train_manifest", required=True, help="CSV with file_path,normalized_transcript (or metadata.csv)")
    add("--path_to_val_manifest", required=True)
    add("--training_epochs", type=int, default=250)
    add("--max_steps", type=int, default=None, help="stop after this many optimiser steps (overrides epochs)")
    add("--console_out_iters", type=int, default=10, help="print a console line every N steps")
    add("--wandb_log_iters", type=int, default=10, help="log scalars to the trackers every N steps")
    add("--checkpoint_epochs", type=int, default=25, help="save a checkpoint every N epochs")
    add("--checkpoint_steps", type=int, default=None, help="also save every N steps")
    add("--validation_steps", type=int, default=1000, help="validate every N steps (and at the end)")
    add("--keep_last_checkpoints", type=int, default=3)
    add("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    add("--init_from", default=None,
        help="start from these weights: NVIDIA's tacotron2_statedict.pt or a checkpoint/export of this repo "
             "(the model flags must describe the same architecture)")
    add("--batch_size", type=int, default=32, help="per process")
    add("--num_workers", type=int, default=4)
    add("--seed", type=int, default=1234)
    add("--skip_bad_files", action="store_true",
        help="drop manifest rows that fail the start-up checks (audio missing, unreadable, empty or shorter than a "
             "hop; no transcript) instead of stopping; says how many")
    # Optimisation
    add("--learning_rate", type=float, default=1e-3)
    add("--min_learning_rate", type=float, default=1e-5,
        help="the learning rate decays exponentially, step by step, from --learning_rate to this at the last step")
    add("--weight_decay", type=float, default=1e-6, help="Adam's L2 penalty (NVIDIA's 1e-6)")
    add("--adam_eps", type=float, default=1e-6)
    add("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    add("--max_nonfinite_steps", type=int, default=20,
        help="stop (after saving the last good state) when this many steps in a row had a non-finite loss or "
             "gradient (0: never stop)")
    # Model
    add("--character_embed_dim", type=int, default=512, help="symbols_embedding_dim")
    add("--encoder_kernel_size", type=int, default=5)
    add("--encoder_n_convolutions", type=int, default=3)
    add("--encoder_embed_dim", type=int, default=512, help="encoder_embedding_dim")
    add("--encoder_dropout_p", type=float, default=0.5)
    add("--decoder_rnn_embed_dim", type=int, default=1024, help="decoder_rnn_dim and attention_rnn_dim")
    add("--decoder_dropout_p", type=float, default=0.1)
    add("--decoder_prenet_dim", type=int, default=256)
    add("--decoder_prenet_depth", type=int, default=2, help="prenet layers: NVIDIA's layout has exactly 2")
    add("--decoder_prenet_dropout_p", type=float, default=0.5, help="on at inference too, as in the paper")
    add("--decoder_postnet_num_convs", type=int, default=5)
    add("--decoder_postnet_n_filters", type=int, default=512)
    add("--decoder_postnet_kernel_size", type=int, default=5)
    add("--decoder_postnet_dropout_p", type=float, default=0.5)
    add("--attention_dim", type=int, default=128)
    add("--attention_dropout_p", type=float, default=0.1)
    add("--attention_location_n_filters", type=int, default=32)
    add("--attention_location_kernel_size", type=int, default=31)
    add("--max_decoder_steps", type=int, default=1000, help="inference stops here if the stop token never fires")
    # Audio and mel (DESIGN.md §1)
    add("--sampling_rate", type=int, default=22050)
    add("--num_mels", type=int, default=80)
    add("--n_fft", type=int, default=1024)
    add("--window_size", type=int, default=1024)
    add("--hop_size", type=int, default=256)
    add("--fmin", type=float, default=0.0)
    add("--fmax", type=float, default=8000.0)
    add("--mel_scale", choices=["log", "db"], default="log",
        help="log: NVIDIA's and HiFi-GAN's natural-log mel; db: the seed tutorial's normalised dB")
    add("--min_db", type=float, default=-100.0)
    add("--max_scaled_abs", type=float, default=4.0)
    add("--audio_peak", type=lambda text: None if text.lower() == "none" else float(text), default=0.95,
        help="peak-normalise every clip to this level before taking its mel, as the vocoder's pretraining does; "
             "'none' keeps the recorded level, as NVIDIA's Tacotron2 was trained. Recorded in config.json, so "
             "save_taco_mels.py and finetuning follow it")
    # Logging
    add("--log_wandb", action=argparse.BooleanOptionalAction, default=False, help="same as --report_to wandb")
    add("--report_to", choices=["wandb", "tensorboard", "none"], default=None)
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Tacotron2Config:
    if args.decoder_prenet_depth != 2:
        raise UserError(f"--decoder_prenet_depth {args.decoder_prenet_depth} is not supported: this Tacotron2 keeps "
                        "NVIDIA's two-layer prenet (so that NVIDIA's checkpoint loads); use 2")
    return Tacotron2Config(
        n_symbols=len(symbols),
        symbols_embedding_dim=args.character_embed_dim,
        encoder_kernel_size=args.encoder_kernel_size,
        encoder_n_convolutions=args.encoder_n_convolutions,
        encoder_embedding_dim=args.encoder_embed_dim,
        encoder_dropout=args.encoder_dropout_p,
        n_mel_channels=args.num_mels,
        # The tutorial has one "decoder RNN" width; NVIDIA's model has two LSTMs that share it by default.
        decoder_rnn_dim=args.decoder_rnn_embed_dim,
        attention_rnn_dim=args.decoder_rnn_embed_dim,
        prenet_dim=args.decoder_prenet_dim,
        prenet_dropout=args.decoder_prenet_dropout_p,
        p_decoder_dropout=args.decoder_dropout_p,
        p_attention_dropout=args.attention_dropout_p,
        attention_dim=args.attention_dim,
        attention_location_n_filters=args.attention_location_n_filters,
        attention_location_kernel_size=args.attention_location_kernel_size,
        postnet_embedding_dim=args.decoder_postnet_n_filters,
        postnet_kernel_size=args.decoder_postnet_kernel_size,
        postnet_n_convolutions=args.decoder_postnet_num_convs,
        postnet_dropout=args.decoder_postnet_dropout_p,
        max_decoder_steps=args.max_decoder_steps,
    )


def audio_config(args: argparse.Namespace) -> dict:
    """The mel settings (utils.mel_spectrogram's keyword arguments and the level convention `audio_peak`), stored as
    "audio" in every config.json: teacher forcing reads the model's own (tacotron2.teacher_forcing.mel_settings)."""
    return dict(sampling_rate=args.sampling_rate, n_fft=args.n_fft, num_mels=args.num_mels, hop_size=args.hop_size,
                window_size=args.window_size, fmin=args.fmin, fmax=args.fmax, mel_scale=args.mel_scale,
                min_db=args.min_db, max_scaled_abs=args.max_scaled_abs, center=False, audio_peak=args.audio_peak)


# ---------------------------------------------------------------------------------------------
# Data: (symbol ids, mel) per clip; batches padded, with stop-token targets
# ---------------------------------------------------------------------------------------------

class TextMelDataset(Dataset):
    """Items are (tokens [T_in] long, mel [num_mels, len(audio) // hop_size]) for each row of a manifest.

    Every row is checked at start-up, not hours into training: its audio (exists, readable, not empty, at least one
    hop long: utils.check_audio_files, as the vocoder's MelDataset) and its transcript (present, with at least one
    symbol once cleaned). All bad rows are reported in one UserError naming the manifest; with `skip_bad_files` they
    are dropped instead and counted in a warning (`quiet` leaves that to another process of the run).
    """

    def __init__(self, manifest: str | os.PathLike, audio: dict, skip_bad_files: bool = False,
                 quiet: bool = False) -> None:
        rows = read_manifest(manifest, check_files=False)
        self.audio = audio
        reasons: dict[int, list[str]] = {}
        for row, reason in check_audio_files(rows, min_seconds=audio["hop_size"] / audio["sampling_rate"]):
            reasons.setdefault(id(row), []).append(f"{row.audio_path}: {reason}")
        self.rows, self.tokens = [], []
        for row in rows:
            tokens = text_to_sequence(row.transcript) if (row.transcript or "").strip() else None
            if tokens is None:
                reasons.setdefault(id(row), []).append(
                    f"no transcript for {row.audio_path} (Tacotron2 needs a 'normalized_transcript' column, "
                    "which prep_splits.py writes)")
            elif not tokens:
                reasons.setdefault(id(row), []).append(
                    f"the transcript {row.transcript!r} has no symbol Tacotron2 knows once cleaned")
            if id(row) not in reasons:
                self.rows.append(row)
                self.tokens.append(torch.tensor(tokens, dtype=torch.long))
        bad = [f"line {row.line}: {'; '.join(reasons[id(row)])}" for row in rows if id(row) in reasons]
        if bad and not skip_bad_files:
            if len(bad) == 1:
                raise UserError(f"{manifest}, {bad[0]}; fix the row, or pass --skip_bad_files to drop it")
            raise UserError(f"{len(bad)} bad rows in {manifest} (fix them, or pass --skip_bad_files to drop them):"
                            "\n  " + "\n  ".join(bad))
        if bad and not quiet:
            warnings.warn(f"--skip_bad_files: dropped {len(bad)} bad rows of {manifest}, kept {len(self.rows)}:\n  "
                          + "\n  ".join(bad), stacklevel=2)
        if not self.rows:
            raise UserError(f"no usable rows left in {manifest}")
        # Build the mel filter bank in the main process: DataLoader workers forked later inherit the cache.
        mel_spectrogram(torch.zeros(audio["n_fft"]), **mel_kwargs(audio))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # At the level convention recorded with the model (--audio_peak): teacher forcing reads its clips the same way.
        audio = torch.from_numpy(load_clip(self.rows[index].audio_path, self.audio))
        return self.tokens[index], mel_spectrogram(audio, **mel_kwargs(self.audio))


def tacotron2_loss(mel: torch.Tensor, mel_postnet: torch.Tensor, gate: torch.Tensor, mel_target: torch.Tensor,
                   gate_target: torch.Tensor, output_lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(total, mel MSE, post-net mel MSE, stop-token BCE), each averaged over the real frames of the batch only.

    NVIDIA averages over the padding too, which weighs a clip by the longest one in its batch; masking makes the
    loss of a clip independent of what it was batched with.
    """
    valid = ~padding_mask(output_lengths.to(mel_target.device), mel_target.shape[2])
    frames = valid.sum()

    def masked_mse(prediction: torch.Tensor) -> torch.Tensor:
        squared = (prediction.float() - mel_target.float()).pow(2) * valid[:, None, :]
        return squared.sum() / (frames * mel_target.shape[1])

    loss_mel, loss_postnet = masked_mse(mel), masked_mse(mel_postnet)
    loss_gate = (F.binary_cross_entropy_with_logits(gate.float(), gate_target.float(), reduction="none")
                 * valid).sum() / frames
    return loss_mel + loss_postnet + loss_gate, loss_mel, loss_postnet, loss_gate


# ---------------------------------------------------------------------------------------------
# Checkpoints (DESIGN.md §3, as ../train.py) and start weights
# ---------------------------------------------------------------------------------------------

def init_weights(model: Tacotron2, path: str | os.PathLike) -> None:
    """Copy the weights of NVIDIA's file or a folder/export of this repo into `model` (architectures must match)."""
    try:
        pretrained = load_tacotron2(path, config=model.config)
    except UserError as error:
        raise UserError(f"--init_from: {error}. The model flags (--character_embed_dim, --encoder_embed_dim, "
                        "--decoder_rnn_embed_dim, ...) must describe the architecture of the weights") from None
    model.load_state_dict(pretrained.state_dict())


# ---------------------------------------------------------------------------------------------
# Validation: teacher-forced loss, plots, Griffin-Lim audio
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def validate(model: Tacotron2, loader: DataLoader, device: torch.device) -> tuple[dict[str, float], tuple]:
    """Teacher-forced losses over the validation set (masked as in training), plus the first clip's
    (tokens, ground-truth mel, predicted post-net mel, alignment) for plots."""
    model.eval()
    totals, total_frames, first = torch.zeros(4), 0, None
    for text, text_lengths, mel, gate, output_lengths in loader:
        text, mel, gate = text.to(device), mel.to(device), gate.to(device)
        mel_out, mel_postnet, gate_out, alignments = model(text, text_lengths, mel, output_lengths)
        losses = tacotron2_loss(mel_out, mel_postnet, gate_out, mel, gate, output_lengths)
        frames = int(output_lengths.sum())
        totals += torch.stack([loss.detach().float().cpu() for loss in losses]) * frames
        total_frames += frames
        if first is None:
            n_in, n_out = int(text_lengths[0]), int(output_lengths[0])
            first = (text[0, :n_in].cpu(), mel[0, :, :n_out].cpu(), mel_postnet[0, :, :n_out].float().cpu(),
                     alignments[0, :n_out, :n_in].float().cpu())
    model.train()
    names = ("val/loss", "val/loss_mel", "val/loss_mel_postnet", "val/loss_gate")
    return dict(zip(names, (totals / max(total_frames, 1)).tolist())), first


def plot_validation(mels: dict[str, torch.Tensor], alignments: dict[str, torch.Tensor]) -> dict:
    """Figures: the mels one above the other (same colour scale), and the attention alignments."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures = {}
    low, high = min(float(m.min()) for m in mels.values()), max(float(m.max()) for m in mels.values())
    figure, axes = plt.subplots(len(mels), 1, figsize=(10, 2.5 * len(mels)), squeeze=False)
    for axis, (title, mel) in zip(axes[:, 0], mels.items()):
        image = axis.imshow(mel.numpy(), origin="lower", aspect="auto", interpolation="none", vmin=low, vmax=high)
        axis.set_title(title)
        axis.set_ylabel("mel bin")
        figure.colorbar(image, ax=axis)
    axes[-1, 0].set_xlabel("frame")
    figure.tight_layout()
    figures["mels"] = figure
    figure, axes = plt.subplots(1, len(alignments), figsize=(5 * len(alignments), 4), squeeze=False)
    for axis, (title, alignment) in zip(axes[0], alignments.items()):
        image = axis.imshow(alignment.T.numpy(), origin="lower", aspect="auto", interpolation="none")
        axis.set_title(title)
        axis.set_xlabel("decoder step (mel frame)")
        axis.set_ylabel("encoder step (symbol)")
        figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figures["alignment"] = figure
    return figures


def log_validation_media(accelerator: Accelerator, report_to: str | None, step: int, model: Tacotron2,
                         first: tuple, audio: dict, save_dir: Path | None) -> None:
    """Mel and alignment images of the first validation clip, teacher-forced and free-running (`infer`); with
    --save_audio_gen, Griffin-Lim audio of both predicted mels too, logged and written to the folder."""
    if (report_to is None and save_dir is None) or first is None:
        return
    import matplotlib.pyplot as plt
    tokens, mel_true, mel_teacher_forced, alignment = first
    model.eval()
    with warnings.catch_warnings():
        # An early model rarely fires its stop token; a cut-off output is expected then, not worth a warning.
        warnings.simplefilter("ignore", RuntimeWarning)
        _, mel_inferred, _, alignment_inferred = model.infer(
            tokens.to(accelerator.device), max_decoder_steps=min(model.config.max_decoder_steps,
                                                                 2 * mel_true.shape[1] + 10))
    model.train()
    mel_inferred, alignment_inferred = mel_inferred[0].float().cpu(), alignment_inferred[0].float().cpu()
    figures = plot_validation({"ground truth": mel_true, "teacher-forced (post-net)": mel_teacher_forced,
                               "inferred (post-net)": mel_inferred},
                              {"teacher-forced alignment": alignment, "inferred alignment": alignment_inferred})
    sounds = {}
    if save_dir is not None:
        # griffin_lim reads the mel parameters off a vocoder config
        config = HifiGanConfig(**{k: v for k, v in audio.items() if k not in ("center", "audio_peak")})
        sounds = {"teacher_forced": griffin_lim(mel_teacher_forced, config),
                  "inferred": griffin_lim(mel_inferred, config)}
        save_dir.mkdir(parents=True, exist_ok=True)
        for name, figure in figures.items():
            figure.savefig(save_dir / f"step_{step}_{name}.png")
        for name, sound in sounds.items():
            save_audio(save_dir / f"step_{step}_{name}_griffin_lim.wav", sound, audio["sampling_rate"])
    if report_to == "wandb":
        import wandb
        logs = {f"val/{name}": wandb.Image(figure) for name, figure in figures.items()}
        logs.update({f"val/audio_{name}": wandb.Audio(sound.numpy(), sample_rate=audio["sampling_rate"],
                                                       caption="Griffin-Lim") for name, sound in sounds.items()})
        accelerator.get_tracker("wandb").log(logs, step=step)
    elif report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard").writer
        for name, figure in figures.items():
            writer.add_figure(f"val/{name}", figure, step, close=False)
        for name, sound in sounds.items():
            writer.add_audio(f"val/audio_{name}", sound.unsqueeze(0), step, sample_rate=audio["sampling_rate"])
    for figure in figures.values():
        plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> Tacotron2:
    """Train; returns this process's (unwrapped) model."""
    args = parse_args(argv)
    config = build_config(args)
    audio = audio_config(args)
    if not 0 < args.min_learning_rate <= args.learning_rate:
        raise UserError(f"--min_learning_rate {args.min_learning_rate} must be positive and at most "
                        f"--learning_rate {args.learning_rate}")
    run_dir = Path(args.working_directory) / args.experiment_name
    report_to = setup_trackers(args)
    save_dir = None if args.save_audio_gen is None else Path(args.save_audio_gen or run_dir / "generated")

    accelerator = Accelerator(
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # Data order from (seed, epoch), so a resumed run replays the interrupted epoch's order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # The loop steps the scheduler once per optimiser step itself: one schedule whatever the process count.
        step_scheduler_with_optimizer=False,
    )
    check_launch(accelerator)
    set_seed(args.seed, device_specific=False)
    accelerator.print(f"Tacotron2 on {accelerator.num_processes} process(es), device {accelerator.device}, "
                      f"mixed precision {accelerator.mixed_precision}; {args.mel_scale} mel")

    # Data
    quiet = not accelerator.is_main_process  # the other processes check the same rows: one report is enough
    train_set = TextMelDataset(args.path_to_train_manifest, audio, args.skip_bad_files, quiet)
    val_set = TextMelDataset(args.path_to_val_manifest, audio, args.skip_bad_files, quiet)
    pin = accelerator.device.type == "cuda"
    # The loader draws its seeds from a generator of its own, not the global one that the prenet's dropout uses:
    # a resumed run starts its iterator mid-epoch, and must not shift the dropout masks by doing so.
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                              num_workers=args.num_workers, pin_memory=pin,
                              generator=torch.Generator().manual_seed(args.seed))
    val_loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False, collate_fn=collate,
                            num_workers=min(args.num_workers, 1))
    # What each process's share of the loader yields once prepared: whole batches only (drop_last).
    steps_per_epoch = len(train_loader) // accelerator.num_processes
    if steps_per_epoch == 0:
        raise UserError(f"{args.path_to_train_manifest} has {len(train_set)} clips, fewer than one batch of "
                        f"{args.batch_size} x {accelerator.num_processes} processes; lower --batch_size")
    max_steps = args.max_steps if args.max_steps is not None else args.training_epochs * steps_per_epoch

    # Model, optimiser, schedule
    model = Tacotron2(config)
    if args.init_from:
        init_weights(model, args.init_from)
        accelerator.print(f"initialised from {args.init_from}")
        changed = {k: v for k, v in mel_settings(args.init_from).items() if k in audio and audio[k] != v}
        if changed:  # allowed (e.g. adapting to a new mel on purpose), but rarely what one means
            accelerator.print(f"warning: {args.init_from} was trained with other mel settings ("
                              + ", ".join(f"{k} {v} -> {audio[k]}" for k, v in changed.items()) + ")")
    accelerator.print(f"{model.num_parameters() / 1e6:.2f} M parameters")
    # Adam with an L2 penalty, as NVIDIA's recipe and the seed tutorial.
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                 eps=args.adam_eps)
    # Exponential decay, a constant factor per step, from --learning_rate to --min_learning_rate at max_steps.
    decay = math.log(args.min_learning_rate / args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda step: math.exp(decay * min(step / max(max_steps, 1), 1.0)))
    # Every module goes through prepare and the loop calls the *prepared* model, so DDP averages the gradients.
    model, optimizer, scheduler, train_loader = accelerator.prepare(model, optimizer, scheduler, train_loader)
    state = resume(accelerator, args.resume_from_checkpoint, run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    report_to = start_trackers(accelerator, report_to, args.run_name or args.experiment_name, run_dir, vars(args))

    def maybe_validate(force: bool = False) -> None:
        if not (force or state.step % args.validation_steps == 0):
            return
        if accelerator.is_main_process:
            # The prenet's dropout draws random numbers in validation too: fork the RNG so that validating does
            # not change the training run (a resumed run, which did not validate at that point, stays identical).
            with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
                unwrapped = accelerator.unwrap_model(model)
                losses, first = validate(unwrapped, val_loader, accelerator.device)
                accelerator.print(f"step {state.step}: validation loss {losses['val/loss']:.4f} (mel "
                                  f"{losses['val/loss_mel']:.4f}, post-net {losses['val/loss_mel_postnet']:.4f}, "
                                  f"gate {losses['val/loss_gate']:.4f})")
                accelerator.log(losses, step=state.step)
                log_validation_media(accelerator, report_to, state.step, unwrapped, first, audio, save_dir)
        accelerator.wait_for_everyone()

    progress = tqdm(total=max_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train",
                    dynamic_ncols=True)
    last_log_time, last_log_step, skipped_steps, nonfinite_in_a_row = time.perf_counter(), state.step, 0, 0
    saved_step = None  # the step of the last checkpoint this run wrote
    def export(folder: Path) -> None:  # the inference weights inside each checkpoint, with the mel they expect
        save_tacotron2(accelerator.unwrap_model(model), folder, extra={"audio": audio})

    stop_signal, interrupted = StopSignal(), False  # SIGTERM/Ctrl-C: finish the step, save, exit
    stop_reason = None  # too many non-finite steps in a row
    while state.step < max_steps and not interrupted and stop_reason is None:
        epoch = state.epoch
        train_loader.set_epoch(epoch)
        # resumed mid-epoch: skip the batches already seen
        skip = state.start_epoch_at(steps_per_epoch, args.batch_size * accelerator.num_processes)
        loader = accelerator.skip_first_batches(train_loader, skip) if skip > 0 else train_loader
        for text, text_lengths, mel, gate, output_lengths in loader:
            # The batch norms' running statistics, which the forward pass updates: put back if the step is skipped.
            buffers = [buffer.detach().clone() for buffer in model.buffers()]
            mel_out, mel_postnet, gate_out, _ = model(text, text_lengths, mel, output_lengths)
            loss, loss_mel, loss_postnet, loss_gate = tacotron2_loss(mel_out, mel_postnet, gate_out, mel, gate,
                                                                     output_lengths)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0
                                                    else math.inf)
            # A non-finite gradient (which a non-finite loss gives) would poison the weights: skip the step, leaving
            # weights, batch-norm statistics and optimiser state as they were. Gradients are all-reduced, so every
            # process takes the same decision.
            if torch.isfinite(grad_norm):
                optimizer.step()
                nonfinite_in_a_row = 0
            else:
                with torch.no_grad():
                    for buffer, saved in zip(model.buffers(), buffers):
                        buffer.copy_(saved)
                skipped_steps += 1
                nonfinite_in_a_row += 1
                accelerator.print(f"step {state.step + 1}: non-finite loss or gradient, optimiser step skipped "
                                  f"({nonfinite_in_a_row} in a row)")
            scheduler.step()
            state.step += 1
            progress.update(1)

            if state.step % args.wandb_log_iters == 0 or state.step % args.console_out_iters == 0:
                now = time.perf_counter()
                steps_per_second = (state.step - last_log_step) / max(now - last_log_time, 1e-9)
                scalars = {"train/loss": loss.item(), "train/loss_mel": loss_mel.item(),
                           "train/loss_mel_postnet": loss_postnet.item(), "train/loss_gate": loss_gate.item(),
                           "train/grad_norm": float(grad_norm), "train/learning_rate": scheduler.get_last_lr()[0],
                           "train/steps_per_second": steps_per_second, "train/skipped_steps": skipped_steps,
                           "train/epoch": epoch}
                if state.step % args.wandb_log_iters == 0:
                    accelerator.log(scalars, step=state.step)
                if state.step % args.console_out_iters == 0 and accelerator.is_main_process:
                    # tqdm.write is a class method that ignores disable=: without the guard every process prints.
                    progress.set_postfix(loss=f"{scalars['train/loss']:.4f}")
                    progress.write(f"step {state.step} epoch {epoch}: loss {scalars['train/loss']:.4f} "
                                   f"(mel {scalars['train/loss_mel']:.4f}, post-net "
                                   f"{scalars['train/loss_mel_postnet']:.4f}, gate {scalars['train/loss_gate']:.4f}) "
                                   f"grad {scalars['train/grad_norm']:.2f} lr {scalars['train/learning_rate']:.2e} "
                                   f"{steps_per_second:.2f} steps/s")
                last_log_time, last_log_step = now, state.step

            if 0 < args.max_nonfinite_steps <= nonfinite_in_a_row:
                # The skipped steps left weights and optimiser state untouched: what gets saved is the last good state.
                stop_reason = (f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (the last at "
                               f"step {state.step}); saved the last good state")
                break
            if args.checkpoint_steps and state.step % args.checkpoint_steps == 0:
                save_checkpoint(accelerator, run_dir, state, args.keep_last_checkpoints, export)
                saved_step = state.step
            if stop_signal.agreed(accelerator):
                interrupted = True
                break
            maybe_validate()
            if state.step >= max_steps:
                break
        else:
            state.epoch, state.epoch_start_step = state.epoch + 1, state.step
            if state.epoch % args.checkpoint_epochs == 0 and state.step < max_steps:
                save_checkpoint(accelerator, run_dir, state, args.keep_last_checkpoints, export)
                saved_step = state.step

    progress.close()
    final = run_dir / f"checkpoint_{state.step}"
    if saved_step != state.step:
        save_checkpoint(accelerator, run_dir, state, args.keep_last_checkpoints, export)
    if stop_reason is not None:
        accelerator.end_training()
        raise UserError(f"{stop_reason} in {final}. Try a lower --learning_rate or --grad_clip with "
                        "--resume_from_checkpoint latest, or check the data (transcripts that do not match their "
                        "audio, clipped or corrupt wavs)")
    if interrupted:
        accelerator.print(f"stopped by {stop_signal.received or 'a signal on another process'} after step "
                          f"{state.step}; saved {final}. Continue with --resume_from_checkpoint latest")
        accelerator.end_training()
        return accelerator.unwrap_model(model)
    if state.step % args.validation_steps != 0:
        maybe_validate(force=True)
    if accelerator.is_main_process:
        export(run_dir)
        accelerator.print(f"saved {final} and the inference weights {run_dir / 'tacotron2.safetensors'}")
    accelerator.end_training()
    return accelerator.unwrap_model(model)


if __name__ == "__main__":
    run_cli(main)
