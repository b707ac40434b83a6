"""Train HiFi-GAN: pretraining on ground-truth mels, or --finetune on teacher-forced Tacotron2 mels.

    accelerate launch train.py --experiment_name hifigan --working_directory work_dir \
        --path_to_train_manifest data/train.csv --path_to_val_manifest data/test.csv

One CPU, one GPU, many GPUs or many nodes: all through `accelerate launch` and its configs.
Reads top to bottom: flags -> config -> data -> models -> optimisers -> resume -> loop -> checkpoints.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dataset import MelDataset
from inference import vocode
from model import (
    PRESETS,
    Generator,
    HifiGanConfig,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
    load_discriminators,
    load_generator,
    mel_loss,
    save_generator,
)
from utils import UserError, mel_spectrogram, run_cli

VALIDATION_CHUNK_FRAMES = 1024  # about 12 s of 22 kHz audio per generator call

COMPLETE_MARKER = "checkpoint_complete"


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    """'8 8 2 2' arrives as four tokens; '8,8,2,2' or '(8,8,2,2)' as one. Accept all."""
    return [int(v) for v in text.replace("(", " ").replace(")", " ").replace("[", " ").replace("]", " ")
            .replace(",", " ").split()]


def nested_int_tuple(text: str) -> tuple[tuple[int, ...], ...]:
    """Parse '((1,3,5),(1,3,5),(1,3,5))' with ast.literal_eval (never eval: a flag must not run code)."""
    try:
        value = ast.literal_eval(text)
        result = tuple(tuple(int(d) for d in group) for group in value)
    except (ValueError, SyntaxError, TypeError):
        raise argparse.ArgumentTypeError(
            f"expected nested integer tuples like '((1,3,5),(1,3,5))', got {text!r}") from None
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    # Run and data
    add("--experiment_name", required=True, help="run folder name under --working_directory")
    add("--working_directory", required=True, help="where checkpoints and logs go")
    add("--path_to_train_manifest", required=True)
    add("--path_to_val_manifest", required=True)
    add("--training_epochs", type=int, default=3100, help="official: 3100 epochs of LJSpeech at batch 16")
    add("--max_steps", type=int, default=None, help="stop after this many optimiser steps (overrides epochs)")
    add("--console_out_iters", type=int, default=10, help="print a console line every N steps")
    add("--wandb_log_iters", type=int, default=10, help="log scalars to the trackers every N steps")
    add("--checkpoint_epochs", type=int, default=1, help="save a checkpoint every N epochs")
    add("--checkpoint_steps", type=int, default=None, help="also save every N steps")
    add("--validation_steps", type=int, default=1000, help="validate every N steps (and at the end)")
    add("--num_val_clips", type=int, default=None, help="validate on the first N clips only (default: all)")
    add("--keep_last_checkpoints", type=int, default=3)
    add("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    add("--batch_size", type=int, default=16, help="per process")
    add("--num_workers", type=int, default=4)
    add("--mixed_precision", choices=["no", "bf16", "fp16"], default=None,
        help="default: what `accelerate launch`/`accelerate config` says (bf16 is the fast path)")
    add("--compile", action="store_true", help="torch.compile the generator and discriminators (inductor)")
    add("--no_tf32", action="store_true", help="keep fp32 matmuls/convs exact on Ampere+ GPUs (TF32 is on)")
    add("--seed", type=int, default=1234)
    add("--skip_bad_files", action="store_true", help="drop manifest rows that fail the start-up checks")
    # Optimisation
    add("--learning_rate", type=float, default=2e-4)
    add("--beta1", type=float, default=0.8)
    add("--beta2", type=float, default=0.99)
    add("--lr_decay", type=float, default=0.999, help="ExponentialLR gamma, stepped once per epoch")
    add("--lambda_mel", type=float, default=45.0)
    add("--lambda_feature_matching", type=float, default=2.0)
    add("--max_nonfinite_steps", type=int, default=20,
        help="stop (after saving) when this many steps in a row had a non-finite loss or gradient")
    # Model (None = take it from the --config preset)
    add("--config", default="v1", help="preset v1|v2|v3 (or a config.json); explicit flags override it")
    add("--resblock", choices=["1", "2"], default=None)
    add("--upsample_rates", type=int_list, nargs="+", default=None)
    add("--upsample_kernel_sizes", type=int_list, nargs="+", default=None)
    add("--upsample_initial_channel", type=int, default=None)
    add("--resblock_kernel_sizes", type=int_list, nargs="+", default=None)
    add("--resblock_dilation_sizes", type=nested_int_tuple, default=None, help="'((1,3,5),(1,3,5),(1,3,5))'")
    add("--mpd_periods", type=int_list, nargs="+", default=None)
    add("--discriminator_width_divisor", type=int, default=None,
        help="thin every discriminator layer by this factor (1 = official; tests use 8)")
    # Audio and mel (DESIGN.md §1)
    add("--sampling_rate", type=int, default=None)
    add("--segment_size", type=int, default=8192)
    add("--num_mels", type=int, default=None)
    add("--n_fft", type=int, default=None)
    add("--window_size", type=int, default=None)
    add("--hop_size", type=int, default=None)
    add("--fmin", type=float, default=None)
    add("--fmax", type=float, default=None)
    add("--fmax_loss", type=float, default=None, help="mel-loss fmax (default: sampling_rate / 2)")
    add("--mel_scale", choices=["log", "db"], default=None)
    add("--min_db", type=float, default=None)
    add("--max_scaled_abs", type=float, default=None)
    # Logging
    add("--log_wandb", action="store_true", help="same as --report_to wandb")
    add("--report_to", choices=["wandb", "tensorboard", "none"], default=None)
    add("--num_audio_samples", type=int, default=3, help="validation clips logged as audio and mel images")
    # Finetuning on teacher-forced mels
    add("--finetune", action="store_true")
    add("--path_to_saved_mels", default=None, help="folder of <wav stem>.npy teacher-forced mels")
    add("--path_to_pretrained_weights", default=None,
        help="a run or checkpoint folder of this repo, a generator export, or an official g_XXXXXXXX file "
             "(its do_XXXXXXXX beside it is loaded for the discriminators)")
    add("--continue_optimizer_state", action="store_true",
        help="with --finetune: also continue the pretraining run's optimisers and learning-rate schedules (Adam "
             "moments, the decayed learning rate; --learning_rate is then ignored), as the official recipe does. "
             "Needs a run/checkpoint folder of this repo, or an official g_ file with its do_ file beside it")
    args = parser.parse_args(argv)
    for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes", "mpd_periods"):
        if getattr(args, name) is not None:  # nargs="+" of lists -> one flat list
            setattr(args, name, tuple(itertools.chain.from_iterable(getattr(args, name))))
    if args.finetune and not (args.path_to_saved_mels and args.path_to_pretrained_weights):
        parser.error("--finetune needs --path_to_saved_mels DIR and --path_to_pretrained_weights CKPT")
    if args.continue_optimizer_state and not args.finetune:
        parser.error("--continue_optimizer_state goes with --finetune (to continue a run itself, use "
                     "--resume_from_checkpoint)")
    return args


def build_config(args: argparse.Namespace) -> HifiGanConfig:
    base = PRESETS.get(args.config.lower())
    if base is None:
        from model import resolve_config
        base = resolve_config(args.config)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(HifiGanConfig)
                 if getattr(args, f.name, None) is not None}
    config = dataclasses.replace(base, **overrides)
    if math.prod(config.upsample_rates) != config.hop_size:
        raise UserError(f"the upsample rates {config.upsample_rates} multiply to {math.prod(config.upsample_rates)}, "
                        f"but the generator must upsample each mel frame by --hop_size {config.hop_size}")
    if len(config.upsample_rates) != len(config.upsample_kernel_sizes):
        raise UserError("--upsample_rates and --upsample_kernel_sizes need the same number of values")
    if len(config.resblock_kernel_sizes) != len(config.resblock_dilation_sizes):
        raise UserError("--resblock_kernel_sizes and --resblock_dilation_sizes need the same number of entries")
    return config


# ---------------------------------------------------------------------------------------------
# Checkpoints (DESIGN.md §3)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainState:
    """Where the run is. Saved as JSON beside accelerate's state: resuming never unpickles it."""
    step: int = 0
    epoch: int = 0
    # The step at which this epoch began and the clips per step (all processes): a run resumed with another
    # batch size or process count still skips exactly the clips of this epoch it has seen. None in older files.
    epoch_start_step: int | None = None
    global_batch_size: int | None = None

    def start_epoch_at(self, steps_per_epoch: int, global_batch_size: int) -> int:
        """How many batches of this epoch were already done (0 unless resumed mid-epoch), in today's batches."""
        start = self.epoch * steps_per_epoch if self.epoch_start_step is None else self.epoch_start_step
        clips_done = (self.step - start) * (self.global_batch_size or global_batch_size)
        done = min(clips_done // global_batch_size, steps_per_epoch)
        self.epoch_start_step, self.global_batch_size = self.step - done, global_batch_size
        return done


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first. A folder without the marker (killed mid-write) is not one."""
    found = [path for path in run_dir.glob("checkpoint_*")
             if path.name.removeprefix("checkpoint_").isdigit() and (path / COMPLETE_MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint_")))


# What a failed write (full disk, quota, I/O error) raises: OSError from Python's own writes; safetensors a
# SafetensorError ("Error while serializing: I/O error: No space left on device (os error 28)"); torch.save's zip
# writer a RuntimeError that has lost the errno ("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs
# 598", raised while handling "basic_ios::clear: iostream error"; or "PytorchStreamWriter failed writing file ...:
# file write failed"). Other RuntimeErrors (CUDA, bugs) keep their traceback.
_WRITE_FAILURE_MARKERS = ("I/O error", "os error", "No space left", "Disk quota", "file write failed",
                          "PytorchStreamWriter", "unexpected pos", "iostream error")


def _is_write_error(error: Exception) -> bool:
    from safetensors import SafetensorError
    if isinstance(error, OSError):
        return True
    text = f"{error} {error.__context__ or ''}"
    return isinstance(error, (RuntimeError, SafetensorError)) and any(m in text for m in _WRITE_FAILURE_MARKERS)


def _describe_write_error(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f": {error.filename}" if error.filename else "")
    text = str(error)
    if error.__context__ is not None and str(error.__context__) not in text:
        text += f" ({error.__context__})"
    if text.startswith("[enforce fail at") and "]" in text:  # torch's C++ source location: noise to a user
        text = text.split("]", 1)[1].lstrip(" .")
    if isinstance(error, RuntimeError):  # only torch.save's zip writer gets here (see _WRITE_FAILURE_MARKERS)
        text = f"torch.save failed: {text}"
    return " ".join(text.split())[:300]


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def _human_bytes(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.0f} kB"


def _remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Delete .tmp_checkpoint_* folders (writes that never finished): never resumable, and they hold disk space."""
    partials = sorted(run_dir.glob(".tmp_checkpoint_*"))
    for partial in partials:
        shutil.rmtree(partial, ignore_errors=True)
    return partials


def _on_any_process(accelerator: Accelerator, flag: bool) -> bool:
    """`flag` or-ed over all processes. Collective: every process must reach it."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def _write_failed(accelerator: Accelerator, run_dir: Path, tmp: Path, step: int, error: Exception | None
                  ) -> UserError:
    """Remove the partial folder; one line: what failed, where, the space needed and free, where to resume.
    Every process calls it (it ends in a barrier)."""
    if accelerator.is_main_process:
        for bar in list(tqdm._instances):  # end the progress bar's line, so the error prints on a line of its own
            bar.close()
        written = _folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        complete = complete_checkpoints(run_dir)
        needed = _folder_bytes(complete[-1]) if complete else written
        reason = _describe_write_error(error) if error else "it failed on another process"
        then = (f"free some space, then continue from the last complete checkpoint {complete[-1]} with "
                "--resume_from_checkpoint latest" if complete else
                "there is no complete checkpoint to resume from: free some space and start again")
        free = shutil.disk_usage(run_dir).free
        message = (f"could not write checkpoint_{step} into {tmp} ({reason}); removed that partial folder. "
                   f"A checkpoint needs about {_human_bytes(needed)}{'' if complete else ' or more'}, "
                   f"{'only ' if free < needed else ''}{_human_bytes(free)} is free there; {then}")
    else:
        message = (f"process {accelerator.process_index}: writing checkpoint_{step} failed"
                   + (f" ({_describe_write_error(error)})" if error else " on another process"))
    accelerator.wait_for_everyone()  # the other ranks' lines come after the main process closed its bar
    return UserError(message)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainState, keep_last: int,
                    export: Callable[[Path], None]) -> Path:
    """save_state into a temporary folder, add the inference weights (`export(folder)`), then rename: a kill at
    any moment leaves the last complete checkpoint intact. A failed write (full disk) removes the partial folder
    and raises a one-line UserError."""
    final = run_dir / f"checkpoint_{state.step}"
    tmp = run_dir / f".tmp_checkpoint_{state.step}"
    if accelerator.is_main_process:
        _remove_partial_checkpoints(run_dir)  # this step's and a killed run's: they may be what fills the disk
    accelerator.wait_for_everyone()
    # Every process writes (its RNG state at least). Each catches its own write error, then all agree through a
    # collective that all of them reach, so under DDP every rank raises together rather than waiting in a barrier
    # for one that has exited; only the main process cleans up and says why. Any other exception still leaves the
    # others waiting until `accelerate launch` (torchrun) sees the failed rank and terminates the rest.
    error = None
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "train_state.json").write_text(json.dumps(dataclasses.asdict(state)))
            export(tmp)
            (tmp / COMPLETE_MARKER).write_text(f"step {state.step}\n")
    except Exception as caught:
        if not _is_write_error(caught):
            raise
        error = caught
    if _on_any_process(accelerator, error is not None):
        raise _write_failed(accelerator, run_dir, tmp, state.step, error) from error
    if accelerator.is_main_process:
        try:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as caught:
            error = caught
        else:
            for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    if _on_any_process(accelerator, error is not None):  # also the barrier: nobody goes on before the rename
        raise _write_failed(accelerator, run_dir, tmp, state.step, error) from error
    return final


def check_launch(accelerator: Accelerator) -> None:
    """`accelerate launch --multi_gpu` with no GPU and no ACCELERATE_USE_CPU starts N unrelated
    single-process runs that would all write the same checkpoints (DESIGN.md §7): refuse that."""
    launched_world = int(os.environ.get("WORLD_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if launched_world > 1 and accelerator.num_processes == 1:
        raise UserError(f"launched as {launched_world} processes but each runs alone (no GPUs?); for "
                        "multi-process CPU training set ACCELERATE_USE_CPU=1 before `accelerate launch --multi_gpu`")


class StopSignal:
    """SIGTERM (preemption) or SIGINT (Ctrl-C) asks the loop to finish its step, save and exit.

    A second signal of the same kind acts as usual (kills / raises KeyboardInterrupt), so a stuck
    run can still be stopped by force.
    """

    def __init__(self):
        self.received: str | None = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every process once any process got a signal (they must all save the same step)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)


def find_resume_checkpoint(value: str, run_dir: Path) -> Path | None:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:  # the main process
        for partial in _remove_partial_checkpoints(run_dir):
            print(f"ignoring incomplete checkpoint {partial} (the run was killed while writing it); removed it")
    if value != "latest":
        path = Path(value)
        if not (path / COMPLETE_MARKER).exists():
            raise UserError(f"--resume_from_checkpoint {path} is not a complete checkpoint folder "
                            f"(no {COMPLETE_MARKER} file inside); pass 'latest' or another checkpoint_<step>")
        return path
    checkpoints = complete_checkpoints(run_dir)
    for unmarked in sorted(set(run_dir.glob("checkpoint_*")) - set(checkpoints)):
        print(f"ignoring {unmarked}: it has no {COMPLETE_MARKER} file, so it may be incomplete")
    return checkpoints[-1] if checkpoints else None


def resume(accelerator: Accelerator, resume_from: str | None, run_dir: Path, config: dict | None = None
           ) -> TrainState:
    """Restore models, optimisers, schedulers and RNG from `latest` or a checkpoint folder; the step and epoch."""
    if not resume_from:
        return TrainState()
    checkpoint = find_resume_checkpoint(resume_from, run_dir)
    if checkpoint is None:
        accelerator.print(f"no checkpoint in {run_dir} yet; starting from scratch")
        return TrainState()
    load_training_state(accelerator, checkpoint, config)
    state = TrainState(**json.loads((checkpoint / "train_state.json").read_text()))
    accelerator.print(f"resumed from {checkpoint} at step {state.step}, epoch {state.epoch}")
    return state


def load_training_state(accelerator: Accelerator, checkpoint: Path, config: dict | None = None) -> None:
    """accelerator.load_state, with one clear line when the checkpoint is not this run's (other flags, old format):
    the first mismatched tensor and, given this run's model `config`, the settings the checkpoint was made with."""
    try:
        accelerator.load_state(str(checkpoint))
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines()] or [type(error).__name__]
        detail = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                      lines[0])[:200]
        saved_config = checkpoint / "config.json"
        if config is not None and saved_config.exists():
            saved, current = json.loads(saved_config.read_text()), json.loads(json.dumps(config))  # tuples -> lists
            changed = [f"{key} {saved[key]} (now {value})" for key, value in current.items()
                       if key in saved and saved[key] != value]
            if changed:
                detail += "; it was trained with " + ", ".join(changed)
        raise UserError(f"cannot resume from {checkpoint}: it does not fit this run's models ({detail}). Resume with "
                        "the flags it was trained with, or start afresh under another --experiment_name") from error


def load_pretrained(path: str, generator: Generator, mpd: torch.nn.Module, msd: torch.nn.Module) -> str:
    """Start weights for --finetune: a run or checkpoint of this repo, a generator export, or official g_/do_ files."""
    path = pretrained_checkpoint(path)  # a run folder: its newest checkpoint has the discriminators too
    if path.is_dir() and (path / "model.safetensors").exists():  # a checkpoint_<step> folder of this repo
        from safetensors.torch import load_file
        # accelerate numbers the models in the order train.py prepares them: generator, mpd, msd.
        for module, name in ((generator, "model"), (mpd, "model_1"), (msd, "model_2")):
            try:
                module.load_state_dict(load_file(str(path / f"{name}.safetensors")))
            except RuntimeError as error:
                raise UserError(f"{path / name}.safetensors does not fit this model ("
                                f"{str(error).splitlines()[1].strip()}); use the same model flags as its run") from None
        return f"generator and discriminators from {path}"
    generator.load_state_dict(load_generator(path, config=generator.config).state_dict())
    discriminator_file = path.parent / path.name.replace("g_", "do_", 1) if path.name.startswith("g_") else None
    if discriminator_file is not None and discriminator_file.exists():
        load_discriminators(discriminator_file, mpd, msd)
        return f"generator from {path}, discriminators from {discriminator_file}"
    return f"generator from {path} (discriminators start fresh)"


def pretrained_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder's newest complete checkpoint; any other path as it is."""
    path = Path(path)
    if path.is_dir() and not (path / "model.safetensors").exists() and complete_checkpoints(path):
        return complete_checkpoints(path)[-1]
    return path


def continue_optimizer_state(path: str, optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
                             schedulers: tuple) -> str:
    """Load the (generator, discriminator) optimiser and scheduler states of a pretraining run into this run's.

    From a checkpoint of this repo (accelerate's optimizer*.bin / scheduler*.bin) or an official do_XXXXXXXX
    (keys optim_g, optim_d and epoch: the official code rebuilds its ExponentialLR at that epoch).
    """
    checkpoint = pretrained_checkpoint(path)
    if checkpoint.is_dir() and (checkpoint / "optimizer.bin").exists():
        states = [torch.load(checkpoint / name, map_location="cpu", weights_only=True)
                  for name in ("optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin")]
        optimizer_states, scheduler_states = states[:2], states[2:]
    elif checkpoint.name.startswith("g_") and (checkpoint.parent / checkpoint.name.replace("g_", "do_", 1)).exists():
        official = torch.load(checkpoint.parent / checkpoint.name.replace("g_", "do_", 1), map_location="cpu",
                              weights_only=True)
        if not {"optim_g", "optim_d", "epoch"} <= set(official):
            raise UserError(f"{checkpoint.parent / checkpoint.name.replace('g_', 'do_', 1)} has no optimiser state "
                            "(keys optim_g, optim_d, epoch); finetune without --continue_optimizer_state")
        optimizer_states = [official["optim_g"], official["optim_d"]]
        scheduler_states = [{"last_epoch": official["epoch"], "_step_count": official["epoch"] + 1,
                             "base_lrs": [group["initial_lr"] for group in state["param_groups"]],
                             "_last_lr": [group["lr"] for group in state["param_groups"]]}
                            for state in optimizer_states]
    else:
        raise UserError(f"--continue_optimizer_state: {path} holds no optimiser state; pass a run or checkpoint folder "
                        "of this repo or an official g_ file with its do_ file, or finetune without the flag")
    for optimizer, state, name in zip(optimizers, optimizer_states, ("generator", "discriminator")):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved = [state["state"].get(index, {}).get("exp_avg") for index in range(len(params))]
        if len(state["state"]) > len(params) or any(
                moment is not None and moment.shape != param.shape for moment, param in zip(saved, params)):
            raise UserError(f"the {name} optimiser state in {checkpoint} belongs to another model; use the model "
                            "flags of the pretraining run, or finetune without --continue_optimizer_state")
        optimizer.load_state_dict(state)
    for scheduler, state in zip(schedulers, scheduler_states):
        scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper, or a plain scheduler
        scheduler.load_state_dict({**scheduler.state_dict(), **state})
    return (f"optimisers and schedules continued from {checkpoint}: learning rate "
            f"{optimizers[0].param_groups[0]['lr']:.3g} (--learning_rate ignored)")


# ---------------------------------------------------------------------------------------------
# Logging helpers
# ---------------------------------------------------------------------------------------------

def setup_trackers(args: argparse.Namespace) -> str | None:
    report_to = args.report_to or ("wandb" if args.log_wandb else None)
    if report_to in (None, "none"):
        return None
    if report_to == "wandb" and "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        netrc = Path.home() / ".netrc"
        if not (netrc.exists() and "api.wandb.ai" in netrc.read_text()):
            # No credentials: log offline rather than stop or prompt; `wandb sync` uploads later.
            os.environ["WANDB_MODE"] = "offline"
    return report_to


def start_trackers(accelerator: Accelerator, report_to: str | None, run_name: str, run_dir: Path,
                   hyperparameters: dict) -> str | None:
    """Start the run's tracker; returns `report_to`, or None when its package is missing."""
    if not report_to:
        return None
    # TensorBoard's hparams take only scalars and strings.
    hyperparameters = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hyperparameters.items()}
    wandb_kwargs = {"dir": str(run_dir), "name": run_name}
    if report_to == "wandb" and accelerator.is_main_process:
        # One wandb run per training run: a resumed run appends to the same curves instead of starting new ones.
        id_file = run_dir / "wandb_run_id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        wandb_kwargs.update(id=id_file.read_text().strip(), resume="allow")
    accelerator.init_trackers(run_name, config=hyperparameters, init_kwargs={"wandb": wandb_kwargs})
    if not accelerator.trackers:
        # accelerate drops a tracker whose package is missing (with a warning); log nowhere rather than fail.
        accelerator.print(f"warning: --report_to {report_to}: its package is not installed; not logging")
        return None
    if report_to == "wandb" and os.environ.get("WANDB_MODE") == "offline":
        accelerator.print(f"wandb is offline: logs go to {run_dir / 'wandb'} (upload with `wandb sync`)")
    return report_to


def plot_mels(mel_true: torch.Tensor, mel_generated: torch.Tensor):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    for axis, mel, title in zip(axes, (mel_true, mel_generated), ("ground truth", "generated")):
        axis.imshow(mel.float().cpu().numpy(), origin="lower", aspect="auto", interpolation="none")
        axis.set_title(title)
    figure.tight_layout()
    return figure


def log_media(accelerator: Accelerator, report_to: str | None, step: int, samples: list, sampling_rate: int) -> None:
    """Audio and mel images of a few validation clips, ground truth beside generated."""
    if report_to is None or not samples:
        return
    import matplotlib.pyplot as plt
    if report_to == "wandb":
        import wandb
        logs = {}
        for i, (audio, audio_generated, mel, mel_generated) in enumerate(samples):
            logs[f"val/audio_{i}"] = wandb.Audio(audio_generated.numpy(), sample_rate=sampling_rate,
                                                 caption="generated")
            if step == 0 or not hasattr(log_media, "_logged_truth"):
                logs[f"val/audio_{i}_ground_truth"] = wandb.Audio(audio.numpy(), sample_rate=sampling_rate)
            figure = plot_mels(mel, mel_generated)
            logs[f"val/mel_{i}"] = wandb.Image(figure)
            plt.close(figure)
        log_media._logged_truth = True
        accelerator.get_tracker("wandb").log(logs, step=step)
    elif report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard").writer
        for i, (_, audio_generated, mel, mel_generated) in enumerate(samples):
            writer.add_audio(f"val/audio_{i}", audio_generated.unsqueeze(0), step, sample_rate=sampling_rate)
            figure = plot_mels(mel, mel_generated)
            writer.add_figure(f"val/mel_{i}", figure, step)


@torch.no_grad()
def validate(generator: Generator, loader: DataLoader, config: HifiGanConfig, device: torch.device,
             num_audio_samples: int) -> tuple[float, list]:
    """Mel L1 on whole utterances (the paper's validation metric), plus a few clips to listen to."""
    generator.eval()
    total, count, samples = 0.0, 0, []
    for i, (mel, audio, loss_mel) in enumerate(loader):
        loss_mel = loss_mel.to(device)
        # In chunks (exact, see inference.vocode), so a 10-minute clip costs no more memory than a short one.
        audio_generated = vocode(generator, mel[0], max_chunk_frames=VALIDATION_CHUNK_FRAMES)[None].to(device)
        mel_generated = mel_spectrogram(audio_generated.float(), **config.mel_kwargs(for_loss=True))
        frames = min(mel_generated.shape[-1], loss_mel.shape[-1])
        total += torch.nn.functional.l1_loss(mel_generated[..., :frames], loss_mel[..., :frames]).item()
        count += 1
        if i < num_audio_samples:
            samples.append((audio[0].cpu(), audio_generated[0].float().cpu(), loss_mel[0].cpu(),
                            mel_generated[0].cpu()))
    generator.train()
    return total / max(count, 1), samples


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def step_if_finite(accelerator: Accelerator, optimizer: torch.optim.Optimizer, finite: bool) -> None:
    if finite:
        optimizer.step()
    elif accelerator.scaler is not None:
        # fp16: step() is what updates the GradScaler; skipping it must still lower the loss scale, or the
        # next unscale_ finds the scaler stale and fails.
        accelerator.scaler.update()


def train_step(accelerator: Accelerator, generator: torch.nn.Module, mpd: torch.nn.Module, msd: torch.nn.Module,
               optim_g: torch.optim.Optimizer, optim_d: torch.optim.Optimizer, mel: torch.Tensor, audio: torch.Tensor,
               loss_mel_target: torch.Tensor, mel_kwargs_loss: dict, lambda_mel: float = 45.0,
               lambda_feature_matching: float = 2.0) -> dict[str, torch.Tensor | bool]:
    """One HiFi-GAN step: discriminators, then generator (official order). Returns losses and grad norms.

    An optimiser whose loss or gradient norm is not finite does not step (its weights stay untouched);
    `<name>_stepped` says which stepped. Gradients are all-reduced first, so every process agrees.
    """
    audio = audio.unsqueeze(1)
    audio_generated = generator(mel)
    with torch.autocast(accelerator.device.type, enabled=False):  # the mel loss in full precision
        mel_generated = mel_spectrogram(audio_generated.squeeze(1).float(), **mel_kwargs_loss)

    # Discriminator step, on generated audio detached from the generator.
    optim_d.zero_grad(set_to_none=True)
    real, fake, _, _ = mpd(audio, audio_generated.detach())
    loss_disc = discriminator_loss(real, fake)
    real, fake, _, _ = msd(audio, audio_generated.detach())
    loss_disc = loss_disc + discriminator_loss(real, fake)
    accelerator.backward(loss_disc)
    grad_norm_d = accelerator.clip_grad_norm_(itertools.chain(mpd.parameters(), msd.parameters()), math.inf)
    discriminator_stepped = bool(torch.isfinite(loss_disc.detach()) & torch.isfinite(grad_norm_d))
    step_if_finite(accelerator, optim_d, discriminator_stepped)

    # Generator step: adversarial + feature matching + mel L1, through the just-updated discriminators.
    # Their own gradients from this pass are thrown away (zeroed before the next discriminator step),
    # so under DDP they need not be all-reduced: no_sync saves that communication.
    optim_g.zero_grad(set_to_none=True)
    with accelerator.no_sync(mpd), accelerator.no_sync(msd):
        _, fake_period, fmap_real_period, fmap_fake_period = mpd(audio, audio_generated)
        _, fake_scale, fmap_real_scale, fmap_fake_scale = msd(audio, audio_generated)
        loss_mel = mel_loss(loss_mel_target, mel_generated)
        loss_fm = feature_matching_loss(fmap_real_period, fmap_fake_period) + \
            feature_matching_loss(fmap_real_scale, fmap_fake_scale)
        loss_adv = generator_loss(fake_period) + generator_loss(fake_scale)
        loss_gen = loss_adv + lambda_feature_matching * loss_fm + lambda_mel * loss_mel
        accelerator.backward(loss_gen)
    grad_norm_g = accelerator.clip_grad_norm_(generator.parameters(), math.inf)
    generator_stepped = bool(torch.isfinite(loss_gen.detach()) & torch.isfinite(grad_norm_g))
    step_if_finite(accelerator, optim_g, generator_stepped)
    optim_g.zero_grad(set_to_none=True)
    return {"loss_generator": loss_gen.detach(), "loss_discriminator": loss_disc.detach(),
            "loss_mel": loss_mel.detach(), "loss_feature_matching": loss_fm.detach(),
            "loss_adversarial": loss_adv.detach(), "grad_norm_generator": grad_norm_g,
            "grad_norm_discriminator": grad_norm_d, "discriminator_stepped": discriminator_stepped,
            "generator_stepped": generator_stepped}


def main(argv: list[str] | None = None) -> Generator:
    """Train; returns this process's (unwrapped) generator."""
    args = parse_args(argv)
    config = build_config(args)
    run_dir = Path(args.working_directory) / args.experiment_name
    report_to = setup_trackers(args)

    accelerator = Accelerator(
        log_with=report_to,
        mixed_precision=args.mixed_precision,
        dynamo_backend="inductor" if args.compile else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # Data order from (seed, epoch), so a resumed run replays the interrupted epoch's order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # ExponentialLR steps once per *epoch*; without this, accelerate would step it with every optimiser step.
        step_scheduler_with_optimizer=False,
    )
    check_launch(accelerator)
    set_seed(args.seed, device_specific=False)
    # TF32 tensor cores for fp32 convs/matmuls on Ampere+ (10-bit mantissa inputs, fp32 accumulation):
    # a large speed-up that GAN vocoder training tolerates; --no_tf32 turns it off.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
    accelerator.print(f"HiFi-GAN on {accelerator.num_processes} process(es), device {accelerator.device}, "
                      f"mixed precision {accelerator.mixed_precision}")

    # Data
    saved_mels = args.path_to_saved_mels if args.finetune else None
    train_set = MelDataset(args.path_to_train_manifest, config, args.segment_size, train=True,
                           saved_mels_dir=saved_mels, seed=args.seed, skip_bad_files=args.skip_bad_files)
    val_set = MelDataset(args.path_to_val_manifest, config, args.segment_size, train=False,
                         saved_mels_dir=saved_mels, seed=args.seed, skip_bad_files=args.skip_bad_files)
    if len(train_set) < args.batch_size * accelerator.num_processes:
        raise UserError(f"{args.path_to_train_manifest} has {len(train_set)} clips, fewer than one batch of "
                        f"{args.batch_size} x {accelerator.num_processes} processes; lower --batch_size")
    if args.num_val_clips is not None:
        val_set.rows = val_set.rows[:args.num_val_clips]
    # Workers that stay alive across epochs and keep batches queued, so the GPU never waits on audio decoding
    # (the wait per step is logged as train/data_wait_seconds_per_step).
    workers = {"persistent_workers": True, "prefetch_factor": 4} if args.num_workers > 0 else {}
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.num_workers, pin_memory=accelerator.device.type == "cuda", **workers)
    val_loader = DataLoader(val_set, batch_size=1, shuffle=False, num_workers=min(args.num_workers, 1))

    # Models, optimisers, schedulers
    generator = Generator(config)
    mpd = MultiPeriodDiscriminator(config.mpd_periods, config.discriminator_width_divisor)
    msd = MultiScaleDiscriminator(config.discriminator_width_divisor)
    if args.finetune:
        accelerator.print(f"finetuning: {load_pretrained(args.path_to_pretrained_weights, generator, mpd, msd)}")
    fused = {"fused": True} if accelerator.device.type == "cuda" else {}  # one kernel for all parameters
    optim_g = torch.optim.AdamW(generator.parameters(), args.learning_rate, betas=(args.beta1, args.beta2), **fused)
    optim_d = torch.optim.AdamW(itertools.chain(mpd.parameters(), msd.parameters()), args.learning_rate,
                                betas=(args.beta1, args.beta2), **fused)
    scheduler_g = torch.optim.lr_scheduler.ExponentialLR(optim_g, gamma=args.lr_decay)
    scheduler_d = torch.optim.lr_scheduler.ExponentialLR(optim_d, gamma=args.lr_decay)
    # Every module goes through prepare and the loop calls the *prepared* ones: that is what makes
    # DDP average gradients across processes.
    generator, mpd, msd, optim_g, optim_d, scheduler_g, scheduler_d, train_loader = accelerator.prepare(
        generator, mpd, msd, optim_g, optim_d, scheduler_g, scheduler_d, train_loader)
    if args.continue_optimizer_state:
        accelerator.print(continue_optimizer_state(args.path_to_pretrained_weights, (optim_g, optim_d),
                                                   (scheduler_g, scheduler_d)))
    state = resume(accelerator, args.resume_from_checkpoint, run_dir, config.to_dict())
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    report_to = start_trackers(accelerator, report_to, args.experiment_name, run_dir,
                               {**vars(args), **config.to_dict()})

    steps_per_epoch = len(train_loader)
    max_steps = args.max_steps if args.max_steps is not None else args.training_epochs * steps_per_epoch
    total_epochs = math.ceil(max_steps / steps_per_epoch)
    mel_kwargs_loss = config.mel_kwargs(for_loss=True)
    progress = tqdm(total=max_steps, initial=state.step, disable=not accelerator.is_main_process,
                    desc="train", dynamic_ncols=True)
    nonfinite_in_a_row, nonfinite_total = 0, 0
    last_log_time, last_log_step = time.perf_counter(), state.step
    data_wait = 0.0

    def maybe_validate(force: bool = False) -> None:
        if not (force or state.step % args.validation_steps == 0):
            return
        if accelerator.is_main_process:
            val_error, samples = validate(accelerator.unwrap_model(generator), val_loader, config,
                                          accelerator.device, args.num_audio_samples)
            accelerator.print(f"step {state.step}: validation mel L1 {val_error:.4f}")
            accelerator.log({"val/mel_error": val_error}, step=state.step)
            log_media(accelerator, report_to, state.step, samples, config.sampling_rate)
        accelerator.wait_for_everyone()

    def export(folder: Path) -> None:  # the inference generator inside each checkpoint, for inference.py, --finetune
        save_generator(accelerator.unwrap_model(generator), folder)

    stop_reason, stop_signal, interrupted, final = None, StopSignal(), False, None
    while state.step < max_steps and stop_reason is None and not interrupted:
        epoch = state.epoch
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        # resumed mid-epoch: skip the batches already seen
        skip = state.start_epoch_at(steps_per_epoch, args.batch_size * accelerator.num_processes)
        loader = accelerator.skip_first_batches(train_loader, skip) if skip > 0 else train_loader
        fetch_start = time.perf_counter()
        for mel, audio, loss_mel in loader:
            data_wait += time.perf_counter() - fetch_start
            losses = train_step(accelerator, generator, mpd, msd, optim_g, optim_d, mel, audio, loss_mel,
                                mel_kwargs_loss, args.lambda_mel, args.lambda_feature_matching)
            skipped = [name for name in ("discriminator", "generator") if not losses[f"{name}_stepped"]]
            if skipped:
                nonfinite_in_a_row += 1
                nonfinite_total += 1
                accelerator.print(f"step {state.step + 1}: non-finite loss or gradient, {' and '.join(skipped)} "
                                  f"step skipped ({nonfinite_in_a_row} in a row)")
            else:
                nonfinite_in_a_row = 0

            state.step += 1
            progress.update(1)
            if state.step % args.wandb_log_iters == 0 or state.step % args.console_out_iters == 0:
                now = time.perf_counter()
                steps_per_second = (state.step - last_log_step) / max(now - last_log_time, 1e-9)
                scalars = {f"train/{k}": v.item() for k, v in losses.items() if isinstance(v, torch.Tensor)}
                scalars.update({"train/learning_rate": scheduler_g.get_last_lr()[0],
                                "train/steps_per_second": steps_per_second,
                                "train/data_wait_seconds_per_step": data_wait / max(state.step - last_log_step, 1),
                                "train/nonfinite_steps": nonfinite_total, "train/epoch": epoch})
                if state.step % args.wandb_log_iters == 0:
                    accelerator.log(scalars, step=state.step)
                if state.step % args.console_out_iters == 0 and accelerator.is_main_process:  # tqdm.write ignores
                    progress.set_postfix(mel=f"{scalars['train/loss_mel']:.3f}",
                                         gen=f"{scalars['train/loss_generator']:.2f}",
                                         disc=f"{scalars['train/loss_discriminator']:.2f}")
                    progress.write(
                        f"step {state.step} epoch {epoch}: gen {scalars['train/loss_generator']:.3f} "
                        f"disc {scalars['train/loss_discriminator']:.3f} mel {scalars['train/loss_mel']:.4f} "
                        f"lr {scalars['train/learning_rate']:.2e} {steps_per_second:.2f} steps/s")
                last_log_time, last_log_step, data_wait = now, state.step, 0.0

            if nonfinite_in_a_row >= args.max_nonfinite_steps:
                stop_reason = (f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient; saved the "
                               "last good state. Try a lower --learning_rate, fp32 (no --mixed_precision), "
                               "or check the data")
                break
            if args.checkpoint_steps and state.step % args.checkpoint_steps == 0:
                final = save_checkpoint(accelerator, run_dir, state, args.keep_last_checkpoints, export)
            if stop_signal.agreed(accelerator):
                interrupted = True
                break
            maybe_validate()
            if state.step >= max_steps:
                break
            fetch_start = time.perf_counter()
        else:
            # The epoch ran to its end: decay the learning rate once, as the official recipe does.
            state.epoch, state.epoch_start_step = state.epoch + 1, state.step
            scheduler_g.step()
            scheduler_d.step()
            if state.epoch % args.checkpoint_epochs == 0 and state.epoch < total_epochs:
                final = save_checkpoint(accelerator, run_dir, state, args.keep_last_checkpoints, export)

    progress.close()
    if final is None or final.name != f"checkpoint_{state.step}":  # not saved at this very step already
        final = save_checkpoint(accelerator, run_dir, state, args.keep_last_checkpoints, export)
    if interrupted:
        accelerator.print(f"stopped by {stop_signal.received or 'a signal on another process'} after step "
                          f"{state.step}; saved {final}. Continue with --resume_from_checkpoint latest")
        accelerator.end_training()
        return accelerator.unwrap_model(generator)
    if state.step % args.validation_steps != 0:
        maybe_validate(force=True)
    if accelerator.is_main_process:
        try:
            export(run_dir)
        except Exception as error:
            if not _is_write_error(error):
                raise
            raise UserError(f"saved {final}, but could not write the inference generator into {run_dir} "
                            f"({_describe_write_error(error)}); nothing is lost: {final} holds the same "
                            "generator.safetensors and config.json, so pass that folder to inference.py --checkpoint"
                            ) from error
        accelerator.print(f"saved {final} and the inference generator {run_dir / 'generator.safetensors'}")
    accelerator.end_training()
    if stop_reason:
        raise UserError(stop_reason)
    return accelerator.unwrap_model(generator)


if __name__ == "__main__":
    run_cli(main)
