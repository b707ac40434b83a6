"""The run machinery both training scripts share (train.py for HiFi-GAN, train_tacotron2.py): where a run is,
atomic checkpoints and resume, the launch check, stop signals, trackers, and per-step bookkeeping.

A checkpoint is an accelerate `save_state` folder `<run_dir>/checkpoint_<step>/`, written as `.tmp_checkpoint_<step>`
and renamed once complete (with a `checkpoint_complete` marker inside), plus `train_state.json` and the model's
inference weights; the last N are kept. See docs/design.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from utils import UserError

COMPLETE_MARKER = "checkpoint_complete"


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume
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


CONTENTS = "contents.json"


def state_files(models: list[str], optimizers: list[str], schedulers: list[str]) -> dict[str, str]:
    """{name: file} for what accelerate's save_state writes: it numbers the objects of each kind in the order they
    were prepared (model.safetensors, model_1.safetensors, ...; optimizer.bin, ...; scheduler.bin, ...). Written
    into each checkpoint as contents.json, so that a reader finds a model by its name, not by that order."""
    def numbered(stem: str, suffix: str, names: list[str]) -> dict[str, str]:
        return {name: f"{stem}{'' if i == 0 else f'_{i}'}{suffix}" for i, name in enumerate(names)}
    return {**numbered("model", ".safetensors", models),
            **numbered("optimizer", ".bin", [f"optimizer_{name}" for name in optimizers]),
            **numbered("scheduler", ".bin", [f"scheduler_{name}" for name in schedulers])}


def checkpoint_contents(checkpoint: Path, legacy: dict[str, str]) -> dict[str, str]:
    """{name: file} of a checkpoint: its contents.json, or `legacy` for one written before checkpoints had it."""
    contents = checkpoint / CONTENTS
    return json.loads(contents.read_text()) if contents.exists() else legacy


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainState, keep_last: int,
                    export: Callable[[Path], None], contents: dict[str, str] | None = None) -> Path:
    """save_state into a temporary folder, add the inference weights (`export(folder)`) and `contents` (which file
    holds which model, see `state_files`), then rename: a kill at any moment leaves the last complete checkpoint
    intact. A failed write (full disk) removes the partial folder and raises a one-line UserError."""
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
            if contents:
                (tmp / CONTENTS).write_text(json.dumps(contents, indent=2))
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
    single-process runs that would all write the same checkpoints (docs/design.md §8): refuse that."""
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


# ---------------------------------------------------------------------------------------------
# Trackers
# ---------------------------------------------------------------------------------------------

def setup_trackers(report_to: str | None, log_wandb: bool) -> str | None:
    """The tracker to log to (--report_to, or wandb for the seed's --log_wandb); offline wandb without credentials."""
    report_to = report_to or ("wandb" if log_wandb else None)
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


# ---------------------------------------------------------------------------------------------
# The loop's bookkeeping and its end
# ---------------------------------------------------------------------------------------------

class StepLog:
    """What both training loops do after each optimiser step: count non-finite steps (in a row, and in all), measure
    steps/s and the data loader's wait since the last log, and write scalars to the trackers every
    `tracker_every` steps and a line to the console every `console_every` steps (main process only).

    The step flags may be device tensors: they are fetched together when the step is due for logging (or every
    `SETTLE_EVERY` steps), so the loop never waits for the GPU to say whether a step was finite."""
    SETTLE_EVERY = 50

    def __init__(self, accelerator: Accelerator, progress: tqdm, step: int, tracker_every: int, console_every: int):
        self.accelerator, self.progress = accelerator, progress
        self.tracker_every, self.console_every = tracker_every, console_every
        self.nonfinite_in_a_row = self.nonfinite_total = 0
        self.pending: list[tuple[int, dict[str, torch.Tensor | bool]]] = []
        self.streaks: list[tuple[int, int]] = []  # (step, non-finite steps in a row up to it), since the last check
        self.last_time, self.last_step, self.data_wait = time.perf_counter(), step, 0.0

    def count(self, step: int, stepped: dict[str, torch.Tensor | bool]) -> None:
        """Step `step` is done; `stepped` says, per optimiser, whether it stepped (False: a non-finite loss or
        gradient kept it from stepping)."""
        self.progress.update(1)
        self.pending.append((step, stepped))
        on_host = not any(isinstance(flag, torch.Tensor) for flag in stepped.values())
        if on_host or self.due(step) or len(self.pending) >= self.SETTLE_EVERY:
            self._settle()

    def _settle(self) -> None:
        """Fetch the pending flags (one synchronisation) and account for each step in order."""
        if not self.pending:
            return
        flags = [flag for _, stepped in self.pending for flag in stepped.values()]
        device = next((flag.device for flag in flags if isinstance(flag, torch.Tensor)), "cpu")
        values = torch.stack([torch.as_tensor(flag, device=device).reshape(()) for flag in flags]).tolist()
        values = iter(values)
        for step, stepped in self.pending:
            skipped = [name for name in stepped if not next(values)]
            if not skipped:
                self.nonfinite_in_a_row = 0
                continue
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self.streaks.append((step, self.nonfinite_in_a_row))
            self.accelerator.print(f"step {step}: non-finite loss or gradient, {' and '.join(skipped)} step skipped "
                                   f"({self.nonfinite_in_a_row} in a row)")
        self.pending = []

    def too_many_nonfinite(self, limit: int) -> str | None:
        """The reason to stop once `limit` (> 0) steps in a row were skipped: the weights are still the last good.
        Known once the flags are fetched (at most SETTLE_EVERY steps later); the skipped steps changed nothing."""
        streaks, self.streaks = self.streaks, []
        over = next(((last, count) for last, count in streaks if 0 < limit <= count), None)
        if over is None:
            return None
        return f"{over[1]} steps in a row had a non-finite loss or gradient (the last at step {over[0]})"

    def due(self, step: int) -> bool:
        return step % self.tracker_every == 0 or step % self.console_every == 0

    def log(self, step: int, scalars: dict[str, float], line: Callable[[dict[str, float]], str],
            postfix: dict[str, str]) -> None:
        """Add the throughput scalars, then log to the trackers and/or print `line(scalars)`, as due at `step`."""
        now = time.perf_counter()
        steps = max(step - self.last_step, 1)
        scalars = {**scalars, "train/steps_per_second": (step - self.last_step) / max(now - self.last_time, 1e-9),
                   "train/data_wait_seconds_per_step": self.data_wait / steps,
                   "train/nonfinite_steps": self.nonfinite_total}
        if step % self.tracker_every == 0:
            self.accelerator.log(scalars, step=step)
        if step % self.console_every == 0 and self.accelerator.is_main_process:  # tqdm.write ignores disable=
            self.progress.set_postfix(**postfix)
            self.progress.write(line(scalars))
        self.last_time, self.last_step, self.data_wait = now, step, 0.0


class RunControl:
    """The skeleton both training loops share, around their own steps: when to checkpoint (every `checkpoint_steps`
    steps, every `checkpoint_epochs` epochs), when to stop (a signal, too many non-finite steps, `max_steps`),
    validation every `validation_steps`, and the end of the run (`finish`).

        run = RunControl(...)
        while run.going():
            for batch in loader:
                ...one optimiser step; state.step += 1...
                if run.after_step(stop_reason):
                    break
            else:
                ...state.epoch += 1...
                run.after_epoch()
        run.finish(advice)
    """

    def __init__(self, accelerator: Accelerator, run_dir: Path, state: TrainState, export: Callable[[Path], None],
                 *, max_steps: int, keep_last: int, checkpoint_steps: int | None, checkpoint_epochs: int,
                 validation_steps: int, validate: Callable[[], None], contents: dict[str, str] | None = None):
        self.accelerator, self.run_dir, self.state, self.export = accelerator, run_dir, state, export
        self.max_steps, self.keep_last, self.contents = max_steps, keep_last, contents
        self.checkpoint_steps, self.checkpoint_epochs = checkpoint_steps, checkpoint_epochs
        self.validation_steps, self.validate = validation_steps, validate
        self.stop_signal = StopSignal()  # SIGTERM/Ctrl-C: finish the step, save, exit
        self.interrupted, self.stop_reason, self.last_saved = False, None, None

    def going(self) -> bool:
        return self.state.step < self.max_steps and not self.interrupted and self.stop_reason is None

    def save(self) -> None:
        self.last_saved = save_checkpoint(self.accelerator, self.run_dir, self.state, self.keep_last, self.export,
                                          self.contents)

    def after_step(self, stop_reason: str | None = None) -> bool:
        """After an optimiser step: True when the loop must leave the epoch (stopped, or at max_steps)."""
        if stop_reason:
            self.stop_reason = stop_reason
            return True
        if self.checkpoint_steps and self.state.step % self.checkpoint_steps == 0:
            self.save()
        if self.stop_signal.agreed(self.accelerator):
            self.interrupted = True
            return True
        if self.state.step % self.validation_steps == 0:
            self.validate()
        return self.state.step >= self.max_steps

    def after_epoch(self) -> None:
        """After an epoch ran to its end (the final checkpoint is `finish`'s)."""
        if self.state.epoch % self.checkpoint_epochs == 0 and self.state.step < self.max_steps:
            self.save()

    def finish(self, advice: str) -> Path:
        """The last checkpoint (unless this very step has one); then, for a run stopped by non-finite steps, one line
        with `advice`; for one stopped by a signal, how to continue; for a finished one, the last validation (unless
        this step had it) and the inference weights in the run folder itself. Returns the checkpoint."""
        state, accelerator = self.state, self.accelerator
        if self.last_saved is None or self.last_saved.name != f"checkpoint_{state.step}":
            self.save()
        if self.stop_reason is not None:
            accelerator.end_training()
            raise UserError(f"{self.stop_reason}; saved the last good state in {self.last_saved}. {advice}")
        if self.interrupted:
            accelerator.print(f"stopped by {self.stop_signal.received or 'a signal on another process'} after step "
                              f"{state.step}; saved {self.last_saved}. Continue with --resume_from_checkpoint latest")
            accelerator.end_training()
            return self.last_saved
        if state.step % self.validation_steps != 0:
            self.validate()
        if accelerator.is_main_process:
            try:
                self.export(self.run_dir)
            except Exception as error:
                if not _is_write_error(error):
                    raise
                raise UserError(f"saved {self.last_saved}, but could not write the inference weights into "
                                f"{self.run_dir} ({_describe_write_error(error)}); nothing is lost: "
                                f"{self.last_saved} holds the same weights and config.json, so use that folder "
                                "for inference") from error
            accelerator.print(f"saved {self.last_saved} and the inference weights in {self.run_dir}")
        accelerator.end_training()
        return self.last_saved


# ---------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------

class CudaGraphStep:
    """A training step replayed as one CUDA graph: the host submits a whole step (~2 000 kernels for V1) with one
    call, so the GPU never waits for Python between kernels.

    The first `warmup` calls run eagerly on a side stream (capture needs initialised cuDNN/cuBLAS handles and
    optimiser states); the next captures the step into static input buffers and replays it. Later calls copy their
    inputs into those buffers and replay. `invalidate()` re-captures at the next call: needed whenever something
    the captured kernels took as a launch argument changes, i.e. the learning rate (fused AdamW's `lr`). Needs fixed
    input shapes (train.py's batches: drop_last, fixed segments), one process, and a step that never synchronises
    with the host (model.train_step with fused AdamW and no fp16 GradScaler)."""

    def __init__(self, step: Callable[..., dict], warmup: int = 2):
        self.step, self.warmup = step, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.outputs: dict = {}

    def invalidate(self) -> None:
        self.graph = None

    def __call__(self, *inputs: torch.Tensor) -> dict:
        if self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        if self.graph is None or any(x.shape != s.shape for x, s in zip(inputs, self.inputs)):
            self.graph = None  # frees the previous capture's memory before the new one takes its own
            self.inputs = [x.clone() for x in inputs]
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread keeps pinning the next batches meanwhile, and in the
            # default (global) mode its CUDA calls would invalidate this capture.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self.step(*self.inputs)
        else:
            for static, x in zip(self.inputs, inputs):
                static.copy_(x, non_blocking=True)
        self.graph.replay()
        # Copies: the next replay overwrites the static outputs, and the caller may keep these until it logs.
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.outputs.items()}
