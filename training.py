"""The run machinery both training scripts share (train.py for HiFi-GAN, train_tacotron2.py): the run flags and the
Accelerator, where a run is, atomic checkpoints and resume, the launch check, stop signals (also save_taco_mels.py's),
the record of how a run was started, trackers and media logging, an epoch's batches, and per-step bookkeeping. Each
script keeps its own loop, models, data and optimisation step; a flag added here appears in both.

A checkpoint is an accelerate `save_state` folder `<run_dir>/checkpoint_<step>/`, written as `.tmp_checkpoint_<step>`
and renamed once complete (with a `checkpoint_complete` marker inside), plus `train_state.json` and the model's
inference weights; the last N are kept. See docs/design.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import multiprocessing.context
import os
import shlex
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
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


def ignore_stop_signals(worker_id: int | None = None, main_pid: int | None = None) -> None:
    """A DataLoader's `worker_init_fn`: its workers ignore the stop signals sent to the job, SIGINT and SIGTERM.

    A terminal's Ctrl-C, `timeout`, torchrun's forwarding (`killpg` of each rank) and a scheduler's stop signal reach
    every process of the job, the loader's workers included; torch's workers die of it, and the main process then
    fails with "DataLoader worker (pid N) is killed by signal" instead of saving. The main process alone decides:
    the workers keep loading until it is done, and exit with it (they watch their parent). A SIGTERM from the main
    process itself (`main_pid`, by default the parent: its loader shutting them down, `multiprocessing` at exit)
    still ends a worker: a thread waits for SIGTERM and looks at who sent it. Use it through `signal_safe_workers`,
    which also keeps a signal from reaching a worker before this runs."""
    main_pid = os.getppid() if main_pid is None else main_pid
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # torch never stops a worker with SIGINT
    if not hasattr(signal, "sigwaitinfo"):  # not Linux: the sender cannot be told, SIGTERM keeps its default
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        return
    # Blocked (already, when started by `signal_safe_workers`'s context) in the worker's only thread so far, so in
    # every thread it starts later: a SIGTERM waits for `sigwaitinfo` below instead of killing the worker.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # ignored now; a pending one is dropped

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == main_pid:
                os._exit(0)  # the main process ends its workers (exit 0: its loader takes no error from that)

    threading.Thread(target=watch, name="stop-signal-watch", daemon=True).start()


def _start_with_stop_signals_blocked(start: Callable[[], None]) -> None:
    """Start a worker with SIGINT/SIGTERM blocked: it inherits the mask, so that a signal sent while it starts waits
    until `ignore_stop_signals` has set it up (torch's worker first installs a handler that dies of SIGTERM)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


if hasattr(multiprocessing.context, "ForkContext"):  # POSIX
    class _ForkProcess(multiprocessing.context.ForkProcess):
        def start(self) -> None:
            _start_with_stop_signals_blocked(super().start)

    class _ForkContext(multiprocessing.context.ForkContext):
        Process = _ForkProcess


def signal_safe_workers(num_workers: int) -> dict:
    """DataLoader keyword arguments for workers that leave stop signals to the main process (`ignore_stop_signals`),
    started with the signals blocked (with the fork start method, the default on Linux); {} for no workers."""
    if num_workers == 0:
        return {}
    options = {"worker_init_fn": functools.partial(ignore_stop_signals, main_pid=os.getpid())}
    if multiprocessing.get_start_method() == "fork" and hasattr(multiprocessing.context, "ForkContext"):
        options["multiprocessing_context"] = _ForkContext()
    return options


class Stopped(BaseException):
    """Raised inside `StopSignal.interrupting()` by a stop signal. A BaseException, like KeyboardInterrupt, so that an
    `except Exception` around some work does not take it for that work's failure."""


class StopSignal:
    """SIGTERM (preemption, `scancel`, `timeout`) or SIGINT (Ctrl-C) asks the run to stop cleanly: a training loop
    finishes its step, saves and exits 0 (`RunControl`); work inside `interrupting()` is abandoned at once.

    One stop often arrives several times: to the whole process group and again from the launcher (accelerate's
    one-process launcher sends SIGTERM to its child; torchrun forwards what it gets to each rank's process group).
    Repeats within `REPEAT_SECONDS` of the first are that same stop; one after them stops at once, as the signal
    normally does (KeyboardInterrupt, or death by SIGTERM): a stuck run can still be stopped by hand, except while
    a checkpoint is written (`protected()`), which finishes first.
    """

    REPEAT_SECONDS = 3.0
    # Several processes must stop after the same step: they agree (a tiny all-reduce) about every CHECK_SECONDS,
    # at steps all of them compute alike, rather than after every step (each check waits for the device).
    CHECK_SECONDS = 2.0
    MAX_CHECK_STEPS = 100

    def __init__(self, announce: str = "finishing this step, saving a checkpoint, then stopping"):
        self.received: str | None = None
        self.announce = announce if os.environ.get("RANK", "0") == "0" else None  # one line per run, not per rank
        self._first_at = 0.0
        self._interrupting, self._protected = False, 0
        self._next_check: int | None = None
        self._last_check: tuple[int, float] | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        """Put back the handlers that were there before (for a script run inside another program, as the tests do)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.received is None:
            self.received, self._first_at = name, now
            if self.announce:  # a raw write: the interrupted code may be inside a print to the same stream
                os.write(2, f"\n{name}: {self.announce} (the same signal {self.REPEAT_SECONDS:.0f} s later: stop at "
                            "once)\n".encode())
            if self._interrupting and not self._protected:
                self._interrupting = False
                raise Stopped(name)
            return
        if now - self._first_at < self.REPEAT_SECONDS or self._protected:
            return  # the same stop, forwarded by a launcher; or a checkpoint being written, which finishes first
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    @contextlib.contextmanager
    def interrupting(self):
        """Within: a stop signal raises `Stopped` at once (for work that the next run redoes, with nothing to
        finish first); `protected()` inside it shields a write, after which `Stopped` is raised."""
        if self.received:
            raise Stopped(self.received)
        self._interrupting = True
        try:
            yield
        finally:
            self._interrupting = False

    @contextlib.contextmanager
    def protected(self):
        """Within: no signal interrupts (a checkpoint or file being written); a stop waits for the end."""
        self._protected += 1
        try:
            yield
        finally:
            self._protected -= 1
        if not self._protected and self._interrupting and self.received:
            self._interrupting = False
            raise Stopped(self.received)

    def agreed(self, accelerator: Accelerator, step: int, sync: bool = False) -> bool:
        """True on every process once any process got a signal, after the same step on all of them.

        One process: this process's flag, no tensor, no wait. Several: an all-reduce of the flag at the first step,
        at every `sync` (steps that all processes pass with `sync`: after a checkpoint, a validation), and then every
        few steps: as many as take about CHECK_SECONDS, measured on each process and agreed on (the smallest), so
        that every process checks at the same steps, and a stop waits at most about CHECK_SECONDS longer."""
        if accelerator.num_processes == 1:
            return self.received is not None
        if not sync and self._next_check is not None and step < self._next_check:
            return False
        now = time.perf_counter()
        interval = 1
        if self._last_check is not None and step > self._last_check[0]:
            rate = (step - self._last_check[0]) / max(now - self._last_check[1], 1e-6)  # steps per second
            interval = int(min(max(self.CHECK_SECONDS * rate, 1), self.MAX_CHECK_STEPS))
        flag = 1.0 if self.received else 0.0
        # max of (flag, -interval): any flag, the smallest interval; small integers, exact on every process
        agreed_flag, negative_interval = accelerator.reduce(
            torch.tensor([flag, -float(interval)], device=accelerator.device), reduction="max").tolist()
        self._next_check, self._last_check = step + int(-negative_interval), (step, now)
        return agreed_flag > 0


def stop_deadline() -> tuple[float, str] | None:
    """(seconds, what) when a launcher kills the processes that long after a stop signal: torchrun (`accelerate
    launch` with several processes) after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s by default), accelerate's one-process
    launcher after 5 s. None when nothing is known (`python train.py`; a scheduler's own grace time is not visible)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        seconds = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
        return seconds, (f"torchrun (`accelerate launch` with several processes) kills the processes {seconds:.0f} s "
                         "after a stop signal; allow more with TORCH_ELASTIC_SHUTDOWN_TIMEOUT=<seconds> in the launch "
                         "command's environment")
    try:
        import psutil
        parent = " ".join(psutil.Process(os.getppid()).cmdline())
    except Exception:  # no psutil, or no access to the parent: nothing known
        return None
    if "accelerate" in parent and "launch" in parent:
        return 5.0, ("`accelerate launch` with one process kills it 5 s after a stop signal; start a one-process run "
                     "as `python <script> ...` instead (same flags), which has no such limit")
    return None


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
# What a run folder says about how it was started
# ---------------------------------------------------------------------------------------------

RUN_RECORD = "commands.json"
# The environment that changes what a run does (never credentials).
_RECORDED_ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "WORLD_SIZE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "WANDB_MODE",
                         "SLURM_JOB_ID")


def _launcher_command() -> list[str] | None:
    """The command line of the `accelerate launch` / torchrun that started this process, if one did."""
    try:
        import psutil
        command = psutil.Process(os.getppid()).cmdline()
    except Exception:  # no psutil or no access: the script's own command line is recorded anyway
        return None
    text = " ".join(command)
    return command if ("accelerate" in text and "launch" in text) or "torchrun" in text \
        or "torch.distributed.run" in text else None


def _git_commit(folder: Path) -> dict[str, object] | None:
    import subprocess
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=30)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "uncommitted_changes": bool(status.stdout.strip())}


def record_run(run_dir: Path, script: str | os.PathLike, argv: list[str], flags: dict, processes: int,
               start_step: int) -> Path:
    """Append how this start of the run (the first, or a resume) was made to `<run_dir>/commands.json`: the command
    line (the launcher's, when `accelerate launch`/torchrun started it), every flag with its value (defaults
    included), the process count, the step it started at, the versions of Python, torch, accelerate and numpy, the
    git commit and the environment variables that matter. Main process only."""
    import platform

    import accelerate
    import numpy
    script = Path(script)
    own = shlex.join(["python", str(script), *argv])
    launcher = _launcher_command()
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "accelerate": accelerate.__version__, "numpy": numpy.__version__}
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "start_step": start_step,
             "command": shlex.join(launcher) if launcher else own, "script_command": own,
             "processes": processes, "flags": json.loads(json.dumps(flags, default=str)), "versions": versions,
             "git": _git_commit(script.resolve().parent),
             "environment": {key: value for key, value in sorted(os.environ.items())
                             if key in _RECORDED_ENVIRONMENT or key.startswith("ACCELERATE_")}}
    record = run_dir / RUN_RECORD
    entries = json.loads(record.read_text()) if record.exists() else []
    tmp = record.with_name(f".{record.name}.tmp")
    tmp.write_text(json.dumps([*entries, entry], indent=2) + "\n")
    os.replace(tmp, record)
    return record


# ---------------------------------------------------------------------------------------------
# The run's flags and its Accelerator
# ---------------------------------------------------------------------------------------------

def add_run_flags(parser: argparse.ArgumentParser, *, training_epochs: int, checkpoint_epochs: int, batch_size: int,
                  learning_rate: float) -> None:
    """The flags of the run machinery, declared here once for both training scripts; each script gives its own
    defaults for those that differ, then adds its model's and data's flags."""
    add = parser.add_argument
    # Run and data
    add("--experiment_name", required=True, help="run folder name under --working_directory")
    add("--working_directory", required=True, help="where checkpoints and logs go")
    add("--path_to_train_manifest", required=True,
        help="CSV with file_path (and, for Tacotron2, normalized_transcript), or LJSpeech's metadata.csv")
    add("--path_to_val_manifest", required=True)
    add("--training_epochs", type=int, default=training_epochs)
    add("--max_steps", type=int, default=None, help="stop after this many optimiser steps (overrides epochs)")
    add("--console_out_iters", type=int, default=10, help="print a console line every N steps")
    add("--wandb_log_iters", type=int, default=10, help="log scalars to the trackers every N steps")
    add("--checkpoint_epochs", type=int, default=checkpoint_epochs, help="save a checkpoint every N epochs")
    add("--checkpoint_steps", type=int, default=None, help="also save every N steps")
    add("--validation_steps", type=int, default=1000, help="validate every N steps (and at the end)")
    add("--keep_last_checkpoints", type=int, default=3)
    add("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    add("--batch_size", type=int, default=batch_size, help="per process")
    add("--num_workers", type=int, default=4)
    add("--seed", type=int, default=1234)
    add("--skip_bad_files", action="store_true",
        help="drop manifest rows that fail the start-up checks (audio missing, unreadable, empty or shorter than a "
             "hop; for Tacotron2, no transcript) instead of stopping; says how many")
    # Optimisation
    add("--learning_rate", type=float, default=learning_rate)
    add("--max_nonfinite_steps", type=int, default=20,
        help="stop (after saving the last good state) when this many steps in a row had a non-finite loss or "
             "gradient (0: never stop)")
    # Logging
    add("--log_wandb", action=argparse.BooleanOptionalAction, default=False, help="same as --report_to wandb")
    add("--report_to", choices=["wandb", "tensorboard", "none"], default=None)


def make_accelerator(args: argparse.Namespace, run_dir: Path, report_to: str | None, *, non_blocking: bool = False,
                     **settings) -> Accelerator:
    """The run's Accelerator (`settings`: the script's own, e.g. mixed_precision), checked (`check_launch`) and
    seeded: trackers, the run folder for its logs, a data order drawn from (seed, epoch), so that a resumed run replays
    the interrupted epoch's order, and schedulers stepped by the loop itself (ExponentialLR once per epoch in
    train.py, one schedule whatever the process count in train_tacotron2.py; accelerate would step them with every
    optimiser step, once per process)."""
    accelerator = Accelerator(
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed,
                                                  non_blocking=non_blocking),
        step_scheduler_with_optimizer=False,
        **settings,
    )
    check_launch(accelerator)
    set_seed(args.seed, device_specific=False)
    return accelerator


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


def log_media(accelerator: Accelerator, report_to: str | None, step: int, figures: dict, sounds: dict,
              sampling_rate: int) -> None:
    """Validation figures and audio to the run's tracker, each under `val/<name>` (`sounds`: name -> (audio,
    caption)); the figures are closed after."""
    import matplotlib.pyplot as plt
    if report_to == "wandb":
        import wandb
        logs = {f"val/{name}": wandb.Image(figure) for name, figure in figures.items()}
        logs.update({f"val/{name}": wandb.Audio(sound.numpy(), sample_rate=sampling_rate, caption=caption)
                     for name, (sound, caption) in sounds.items()})
        accelerator.get_tracker("wandb").log(logs, step=step)
    elif report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard").writer
        for name, figure in figures.items():
            writer.add_figure(f"val/{name}", figure, step, close=False)
        for name, (sound, _) in sounds.items():
            writer.add_audio(f"val/{name}", sound.unsqueeze(0), step, sample_rate=sampling_rate)
    for figure in figures.values():
        plt.close(figure)


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


def epoch_batches(accelerator: Accelerator, loader, state: TrainState, step_log: StepLog, steps_per_epoch: int,
                  global_batch_size: int):
    """The batches of epoch `state.epoch` (a resumed run skips those its interrupted epoch already saw), each one's
    wait for the loader added to `step_log.data_wait`."""
    loader.set_epoch(state.epoch)
    skip = state.start_epoch_at(steps_per_epoch, global_batch_size)
    if skip > 0:
        loader = accelerator.skip_first_batches(loader, skip)
    fetch_start = time.perf_counter()
    for batch in loader:
        step_log.data_wait += time.perf_counter() - fetch_start
        yield batch
        fetch_start = time.perf_counter()


class RunControl:
    """The skeleton both training loops share, around their own steps: when to checkpoint (every `checkpoint_steps`
    steps, every `checkpoint_epochs` epochs), when to stop (a signal, too many non-finite steps, `max_steps`),
    validation every `validation_steps`, and the end of the run (`finish`).

        run = RunControl(...)
        while run.going():
            for batch in epoch_batches(accelerator, loader, state, step_log, ...):
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
        self._sync_next = False  # an epoch's checkpoint: all processes check for a stop after the next step
        self._deadline_warned = False

    def going(self) -> bool:
        return self.state.step < self.max_steps and not self.interrupted and self.stop_reason is None

    def stopping(self) -> bool:
        """This process got a stop signal (for work the main process does alone, such as validation, to cut short:
        the loop itself stops when `after_step` says so, on every process after the same step)."""
        return self.stop_signal.received is not None

    def save(self) -> None:
        """A checkpoint of this step, then one line: where, how big, how long it took (and a warning when a launcher
        would kill the run before a checkpoint this slow is written after a stop signal)."""
        started = time.perf_counter()
        with self.stop_signal.protected():
            self.last_saved = save_checkpoint(self.accelerator, self.run_dir, self.state, self.keep_last,
                                              self.export, self.contents)
        seconds = time.perf_counter() - started
        if self.accelerator.is_main_process:
            tqdm.write(f"step {self.state.step}: checkpoint {self.last_saved} written, "
                       f"{_human_bytes(_folder_bytes(self.last_saved))} in {seconds:.1f} s")
            deadline = stop_deadline()
            if deadline is not None and seconds > deadline[0] / 2 and not self._deadline_warned:
                self._deadline_warned = True
                tqdm.write(f"warning: writing a checkpoint took {seconds:.1f} s: after a stop signal the run may be "
                           f"killed before one is written. {deadline[1]}")

    def _stop_agreed(self, sync: bool = False) -> bool:
        if self.stop_signal.agreed(self.accelerator, self.state.step, sync=sync or self._sync_next):
            self.interrupted = True
        self._sync_next = False
        return self.interrupted

    def after_step(self, stop_reason: str | None = None) -> bool:
        """After an optimiser step: True when the loop must leave the epoch (stopped, or at max_steps)."""
        if stop_reason:
            self.stop_reason = stop_reason
            return True
        saved = bool(self.checkpoint_steps and self.state.step % self.checkpoint_steps == 0)
        if saved:
            self.save()
        if self._stop_agreed(sync=saved):
            return True
        if self.state.step % self.validation_steps == 0:
            self.validate()
            if self._stop_agreed(sync=True):  # a signal during validation: stop now, not some steps later
                return True
        return self.state.step >= self.max_steps

    def after_epoch(self) -> None:
        """After an epoch ran to its end (the final checkpoint is `finish`'s)."""
        if self.state.epoch % self.checkpoint_epochs == 0 and self.state.step < self.max_steps:
            self.save()
            self._sync_next = True

    def finish(self, advice: str) -> Path:
        """The last checkpoint (unless this very step has one); then, for a run stopped by non-finite steps, one line
        with `advice`; for one stopped by a signal, how to continue; for a finished one, the last validation (unless
        this step had it) and the inference weights in the run folder itself. Returns the checkpoint."""
        state, accelerator = self.state, self.accelerator
        if self.last_saved is None or self.last_saved.name != f"checkpoint_{state.step}":
            self.save()
        if self.stop_reason is not None:
            accelerator.end_training()
            self.stop_signal.restore()
            raise UserError(f"{self.stop_reason}; saved the last good state in {self.last_saved}. {advice}")
        if self.interrupted:
            accelerator.print(f"stopped by {self.stop_signal.received or 'a signal on another process'} after step "
                              f"{state.step}; saved {self.last_saved}. Continue with --resume_from_checkpoint latest")
            accelerator.end_training()
            self.stop_signal.restore()
            return self.last_saved
        if state.step % self.validation_steps != 0:
            self.validate()
        if accelerator.is_main_process:
            try:
                with self.stop_signal.protected():
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
        self.stop_signal.restore()
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
