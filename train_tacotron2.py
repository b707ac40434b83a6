"""Train Tacotron2 (text -> mel), the first half of the TTS pipeline whose second half is HiFi-GAN.

    accelerate launch train_tacotron2.py --experiment_name tacotron2 --working_directory work_dir \\
        --path_to_train_manifest data/splits/train.csv --path_to_val_manifest data/splits/test.csv

The targets are `utils.mel_spectrogram` of each wav (docs/design.md; `--mel_scale log` by default, the convention
of NVIDIA's Tacotron2 and the official HiFi-GAN), so a vocoder trained in this repo reads what this model writes.
Every `checkpoint_<step>` folder is also a ready inference folder (`tacotron2.safetensors` + `config.json` with the
mel parameters), so `load_tacotron2(folder)` and `save_taco_mels.py --taco_weights folder` take it as it is.
Reads top to bottom like train.py: flags -> config -> data -> model -> optimiser -> resume -> loop -> checkpoints.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tacotron2 import Tacotron2, Tacotron2Config, load_tacotron2, save_tacotron2, symbols
from tacotron2.data import TextMelDataset, collate, tacotron2_loss, train_step
from training import (
    RunControl,
    StepLog,
    add_run_flags,
    epoch_batches,
    log_media,
    make_accelerator,
    record_run,
    resume,
    setup_trackers,
    signal_safe_workers,
    start_trackers,
)
from utils import HelpFormatter, MelConfig, UserError, add_config_flags, config_overrides, run_cli, save_audio
from vocoding import griffin_lim

# ---------------------------------------------------------------------------------------------
# Flags (the seed tutorial's train_taco.sh names, mapped onto NVIDIA's Tacotron2Config in build_config)
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_run_flags(parser, training_epochs=250, checkpoint_epochs=25, batch_size=32, learning_rate=1e-3)
    add = parser.add_argument
    add("--run_name", default=None, help="name of the run in the trackers (default: the experiment name)")
    add("--save_audio_gen", nargs="?", const="", default=None, metavar="DIR",
        help="at each validation, also write the mel/alignment plots and Griffin-Lim audio of the predicted mels "
             "to DIR (the flag alone: <run>/generated) and log the audio to the trackers")
    add("--init_from", default=None,
        help="start from these weights: NVIDIA's tacotron2_statedict.pt or a checkpoint/export of this repo "
             "(the model flags must describe the same architecture)")
    # Optimisation
    add("--min_learning_rate", type=float, default=1e-5,
        help="the learning rate decays exponentially, step by step, from --learning_rate to this at the last step")
    add("--weight_decay", type=float, default=1e-6, help="Adam's L2 penalty (NVIDIA's 1e-6)")
    add("--adam_eps", type=float, default=1e-6)
    add("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
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
    # Audio and mel: a flag for every MelConfig field. --audio_peak and --center are recorded with the model, so
    # save_taco_mels.py and finetuning read each clip as it was read here (NVIDIA's: --audio_peak none --center).
    add_config_flags(parser, MelConfig, "audio and mel", defaults=MelConfig())
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


def mel_config(args: argparse.Namespace) -> MelConfig:
    """The mel settings, stored with the model ("audio" in every config.json) and read back by teacher forcing."""
    return MelConfig(**config_overrides(args, MelConfig)).checked()


def init_weights(model: Tacotron2, path: str | os.PathLike) -> MelConfig:
    """Copy the weights of NVIDIA's file or a folder/export of this repo into `model` (architectures must match);
    returns the mel those weights were trained on."""
    try:
        pretrained = load_tacotron2(path, config=model.config)
    except UserError as error:
        raise UserError(f"--init_from: {error}. The model flags (--character_embed_dim, --encoder_embed_dim, "
                        "--decoder_rnn_embed_dim, ...) must describe the architecture of the weights") from None
    model.load_state_dict(pretrained.state_dict())
    return pretrained.mel


# ---------------------------------------------------------------------------------------------
# Validation: teacher-forced loss, plots, Griffin-Lim audio
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def validate(model: Tacotron2, loader: DataLoader, device: torch.device, stop: Callable[[], bool] | None = None
             ) -> tuple[dict[str, float] | None, tuple]:
    """Teacher-forced losses over the validation set (masked as in training), plus the first clip's
    (tokens, ground-truth mel, predicted post-net mel, alignment) for plots. None instead of the losses when `stop()`
    turned true on the way (a stop signal: the run saves and exits rather than finish it)."""
    model.eval()
    totals, total_frames, first = torch.zeros(4), 0, None
    for text, text_lengths, mel, gate, output_lengths in loader:
        if stop is not None and stop():
            model.train()
            return None, first
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
                         first: tuple, save_dir: Path | None) -> None:
    """Mel and alignment images of the first validation clip, teacher-forced and free-running (`infer`); with
    --save_audio_gen, Griffin-Lim audio of both predicted mels too, logged and written to the folder."""
    if (report_to is None and save_dir is None) or first is None:
        return
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
        sounds = {"teacher_forced": griffin_lim(mel_teacher_forced, model.mel),
                  "inferred": griffin_lim(mel_inferred, model.mel)}
        save_dir.mkdir(parents=True, exist_ok=True)
        for name, figure in figures.items():
            figure.savefig(save_dir / f"step_{step}_{name}.png")
        for name, sound in sounds.items():
            save_audio(save_dir / f"step_{step}_{name}_griffin_lim.wav", sound, model.mel.sampling_rate)
    log_media(accelerator, report_to, step, figures,
              {f"audio_{name}": (sound, "Griffin-Lim") for name, sound in sounds.items()}, model.mel.sampling_rate)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> Tacotron2:
    """Train; returns this process's (unwrapped) model."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    config = build_config(args)
    mel = mel_config(args)
    if not 0 < args.min_learning_rate <= args.learning_rate:
        raise UserError(f"--min_learning_rate {args.min_learning_rate} must be positive and at most "
                        f"--learning_rate {args.learning_rate}")
    run_dir = Path(args.working_directory) / args.experiment_name
    report_to = setup_trackers(args.report_to, args.log_wandb)
    save_dir = None if args.save_audio_gen is None else Path(args.save_audio_gen or run_dir / "generated")

    accelerator = make_accelerator(args, run_dir, report_to)
    accelerator.print(f"Tacotron2 on {accelerator.num_processes} process(es), device {accelerator.device}, "
                      f"mixed precision {accelerator.mixed_precision}; {mel.mel_scale} mel")

    # Data
    quiet = not accelerator.is_main_process  # the other processes check the same rows: one report is enough
    train_set = TextMelDataset(args.path_to_train_manifest, mel, args.skip_bad_files, quiet)
    val_set = TextMelDataset(args.path_to_val_manifest, mel, args.skip_bad_files, quiet)
    pin = accelerator.device.type == "cuda"
    # The loader draws its seeds from a generator of its own, not the global one that the prenet's dropout uses:
    # a resumed run starts its iterator mid-epoch, and must not shift the dropout masks by doing so.
    # The workers leave stop signals, which reach every process of the job, to the main process: it saves and stops.
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                              num_workers=args.num_workers, pin_memory=pin,
                              generator=torch.Generator().manual_seed(args.seed),
                              **signal_safe_workers(args.num_workers))
    val_loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False, collate_fn=collate,
                            num_workers=min(args.num_workers, 1), **signal_safe_workers(min(args.num_workers, 1)))
    # What each process's share of the loader yields once prepared: whole batches only (drop_last).
    steps_per_epoch = len(train_loader) // accelerator.num_processes
    if steps_per_epoch == 0:
        raise UserError(f"{args.path_to_train_manifest} has {len(train_set)} clips, fewer than one batch of "
                        f"{args.batch_size} x {accelerator.num_processes} processes; lower --batch_size")
    max_steps = args.max_steps if args.max_steps is not None else args.training_epochs * steps_per_epoch

    # Model, optimiser, schedule
    model = Tacotron2(config, mel)
    if args.init_from:
        pretrained_mel = init_weights(model, args.init_from)
        accelerator.print(f"initialised from {args.init_from}")
        changed = pretrained_mel.differences(mel, tuple(mel.to_dict()))
        if changed:  # allowed (e.g. adapting to a new mel on purpose), but rarely what one means
            accelerator.print(f"warning: {args.init_from} was trained with other mel settings (theirs (ours): "
                              + ", ".join(changed) + ")")
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
        # How to reproduce it: the command, every flag (defaults included), the versions
        record_run(run_dir, __file__, argv, vars(args), accelerator.num_processes, state.step)
    report_to = start_trackers(accelerator, report_to, args.run_name or args.experiment_name, run_dir, vars(args))

    def validate_now() -> None:
        if accelerator.is_main_process:
            # The prenet's dropout draws random numbers in validation too: fork the RNG so that validating does
            # not change the training run (a resumed run, which did not validate at that point, stays identical).
            with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
                unwrapped = accelerator.unwrap_model(model)
                losses, first = validate(unwrapped, val_loader, accelerator.device, stop=run.stopping)
                if losses is None:
                    accelerator.print(f"step {state.step}: validation cut short by {run.stop_signal.received}")
                else:
                    accelerator.print(f"step {state.step}: validation loss {losses['val/loss']:.4f} (mel "
                                      f"{losses['val/loss_mel']:.4f}, post-net {losses['val/loss_mel_postnet']:.4f}, "
                                      f"gate {losses['val/loss_gate']:.4f})")
                    accelerator.log(losses, step=state.step)
                    log_validation_media(accelerator, report_to, state.step, unwrapped, first, save_dir)
        accelerator.wait_for_everyone()

    progress = tqdm(total=max_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train",
                    dynamic_ncols=True)
    step_log = StepLog(accelerator, progress, state.step, args.wandb_log_iters, args.console_out_iters)

    def export(folder: Path) -> None:  # the inference weights inside each checkpoint, with the mel they expect
        save_tacotron2(accelerator.unwrap_model(model), folder)  # with model.mel as "audio"

    def console_line(scalars: dict[str, float]) -> str:
        return (f"step {state.step} epoch {state.epoch}: loss {scalars['train/loss']:.4f} "
                f"(mel {scalars['train/loss_mel']:.4f}, post-net {scalars['train/loss_mel_postnet']:.4f}, "
                f"gate {scalars['train/loss_gate']:.4f}) grad {scalars['train/grad_norm']:.2f} "
                f"lr {scalars['train/learning_rate']:.2e} {scalars['train/steps_per_second']:.2f} steps/s")

    run = RunControl(accelerator, run_dir, state, export, max_steps=max_steps, keep_last=args.keep_last_checkpoints,
                     checkpoint_steps=args.checkpoint_steps, checkpoint_epochs=args.checkpoint_epochs,
                     validation_steps=args.validation_steps, validate=validate_now)
    while run.going():
        epoch = state.epoch
        for batch in epoch_batches(accelerator, train_loader, state, step_log, steps_per_epoch,
                                   args.batch_size * accelerator.num_processes):
            # A non-finite gradient would poison the weights: the step is skipped (optimiser_stepped False).
            losses = train_step(accelerator, model, optimizer, batch, args.grad_clip)
            scheduler.step()
            state.step += 1
            step_log.count(state.step, {"optimiser": losses["optimiser_stepped"]})
            if step_log.due(state.step):
                scalars = {f"train/{k}": float(v) for k, v in losses.items() if isinstance(v, torch.Tensor)}
                scalars.update({"train/learning_rate": scheduler.get_last_lr()[0], "train/epoch": epoch})
                step_log.log(state.step, scalars, console_line, {"loss": f"{scalars['train/loss']:.4f}"})
            # The skipped steps left weights and optimiser state untouched: what gets saved is the last good state.
            if run.after_step(step_log.too_many_nonfinite(args.max_nonfinite_steps)):
                break
        else:
            state.epoch, state.epoch_start_step = state.epoch + 1, state.step
            run.after_epoch()

    progress.close()
    run.finish(advice="Try a lower --learning_rate or --grad_clip with --resume_from_checkpoint latest, or check "
               "the data (transcripts that do not match their audio, clipped or corrupt wavs)")
    return accelerator.unwrap_model(model)


if __name__ == "__main__":
    run_cli(main)
