"""Stop signals as a terminal or a scheduler sends them: to the whole process group (Ctrl-C, `timeout`, `kill -TERM
-<pgid>`) or to every process of the job (SLURM's `scancel` and preemption), with DataLoader workers, under one
process and under `accelerate launch` with two. The step finishes, one complete checkpoint is written, every process
exits 0, and `--resume_from_checkpoint latest` continues exactly. The same for train_tacotron2.py, and for
save_taco_mels.py (no half-written .npy; a rerun continues).

Each signal is sent at a chosen moment (mid-step, during validation, during a checkpoint write) by a separate process,
started by the run itself from a patched function; the run then waits until it has received it, so that it lands
inside that moment whatever the machine's speed."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_TIMEOUT, REPO, TINY_FLAGS, write_corpus
from test_reliability import losses
from test_save_taco_mels import tiny_tacotron2
from test_tacotron2_train import TINY_FLAGS as TACOTRON2_FLAGS

import training

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
          "--num_cpu_threads_per_process", "1"]
ENV = {"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}

# Sends a signal as a terminal does (`group`: to a process group) or as SLURM does (`every`: to each process of the
# job, launcher, ranks and DataLoader workers alike).
SENDER = """import os, signal, sys
import psutil
how, name, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
signum = getattr(signal, name)
signal.signal(signum, signal.SIG_IGN)  # the sender may be in the group it signals
if how == "group":
    os.killpg(target, signum)
else:
    job = psutil.Process(target)
    for process in [job, *job.children(recursive=True)]:
        if process.pid != os.getpid():
            process.send_signal(signum)
"""

# python inject.py <module> <script args>: runs train.py / train_tacotron2.py / save_taco_mels.py with one function
# (STOP_WHERE) patched to have STOP_SIGNAL sent (by SENDER, as STOP_HOW says) to the job whose launcher's process id
# is in the file STOP_JOB when the main process calls it for the STOP_AT-th time, and to wait until the run's
# StopSignal has it before it goes on.
INJECT = """import os, subprocess, sys, time
sys.path.insert(0, {repo!r})
import importlib, training
module = importlib.import_module(sys.argv[1])
instances = []
original_init = training.StopSignal.__init__
def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    instances.append(self)
training.StopSignal.__init__ = init

def patched(owner, name, main_only=True):
    original, calls = getattr(owner, name), [0]
    def wrapper(*args, **kwargs):
        if not main_only or os.environ.get("RANK", "0") == "0":
            calls[0] += 1
            if calls[0] == int(os.environ["STOP_AT"]):
                job = open(os.environ["STOP_JOB"]).read()
                subprocess.run([sys.executable, {sender!r}, os.environ["STOP_HOW"], os.environ["STOP_SIGNAL"], job],
                               check=True)
                deadline = time.time() + {hang}
                while not (instances and instances[-1].received):
                    assert time.time() < deadline, "the signal never arrived"
                    time.sleep(0.01)
        return original(*args, **kwargs)
    setattr(owner, name, wrapper)

where = os.environ["STOP_WHERE"]
if where == "step":
    patched(module, "train_step", main_only=False)
elif where == "checkpoint":  # inside the write: after accelerate's files, before the export, marker and rename
    original_save = training.save_checkpoint
    def save_checkpoint(accelerator, run_dir, state, keep_last, export, contents=None):
        return original_save(accelerator, run_dir, state, keep_last, patched_export(export), contents)
    def patched_export(export):
        holder = type("Holder", (), {{"export": staticmethod(export)}})
        patched(holder, "export")
        return holder.export
    training.save_checkpoint = save_checkpoint
else:
    patched(module, where)  # "validate" (train.py, train_tacotron2.py), "write_npy" (save_taco_mels.py)
from utils import run_cli
sys.argv = [module.__file__, *sys.argv[2:]]
run_cli(module.main)
"""

# python watcher.py <script> <args>: runs `python <script> <args>` as its child, in its own process group (so it
# gets the group's signals, which the watcher ignores) and says how that process really ended: its exit status.
WATCHER = """import os, signal, sys
child = os.fork()
if child == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)
code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
print(f"rank {os.environ.get('RANK')} exit status {code}", flush=True)
sys.exit(code if code >= 0 else 128 - code)
"""


def scripts(tmp_path: Path) -> dict[str, Path]:
    sender = tmp_path / "sender.py"
    sender.write_text(SENDER)
    files = {"inject": INJECT.format(repo=str(REPO), sender=str(sender), hang=HANG_TIMEOUT), "watcher": WATCHER}
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    return {name: tmp_path / f"{name}.py" for name in files}


def start(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    """In a session of its own, as a terminal starts a job: its process id is the group's id."""
    with open(log, "w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **ENV, **env})


def job(command: list[str], log: Path, **stop: str) -> tuple[int, str]:
    """Run `command` to its end; with `stop` (how, signal, where, at: see INJECT), the launcher's process id goes into
    a file for the injected code to signal its job."""
    environment = {f"STOP_{key.upper()}": str(value) for key, value in stop.items()}
    if stop:
        environment["STOP_JOB"] = str(log.with_suffix(".pid"))
    process = start(command, log, **environment)
    if stop:
        log.with_suffix(".pid").write_text(str(process.pid))  # long before the run gets to `where`
    try:
        code = process.wait(timeout=HANG_TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return code, log.read_text()


def check_stopped(code: int, output: str, name: str, processes: int, run_dir: Path, step: int) -> None:
    """Every process exited 0 after finishing step `step`; one complete checkpoint of it, nothing half-written."""
    if processes == 1:
        assert code == 0, output[-3000:]
    else:
        # torchrun forwarded the signal to both ranks, waited for them, then reports the signal as its own end
        assert code == 128 + getattr(signal, name), output[-3000:]
        assert sorted(re.findall(r"rank (\d) exit status (-?\d+)", output)) == [("0", "0"), ("1", "0")], \
            output[-3000:]
    assert output.count(f"stopped by {name} after step {step}; saved {run_dir / f'checkpoint_{step}'}") == 1, \
        output[-3000:]
    assert "Traceback" not in output and "killed by signal" not in output, output[-3000:]
    assert (run_dir / f"checkpoint_{step}" / training.COMPLETE_MARKER).exists()
    assert not list(run_dir.glob(".tmp_checkpoint_*"))


def train_flags(tmp_path: Path, corpus, *extra: str, name: str = "run") -> list[str]:
    return ["--experiment_name", name, "--working_directory", str(tmp_path), "--path_to_train_manifest",
            str(corpus[0]), "--path_to_val_manifest", str(corpus[1]), "--batch_size", "2", "--num_workers", "2",
            "--console_out_iters", "1", "--checkpoint_epochs", "1000", *TINY_FLAGS, *extra]


def launched(processes: int, script: Path, *args: str, watcher: Path | None = None) -> list[str]:
    """One process: `python script args`, as a terminal runs it. Two: `accelerate launch` (torchrun) over them, each
    rank through `watcher` when given (it prints the rank's real exit status)."""
    if processes == 1:
        return [sys.executable, str(script), *args]
    return [*LAUNCH, *([str(watcher)] if watcher else []), str(script), *args]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory, tiny_corpus):
    """{processes: {step: loss line}} of straight runs, without a stop: what a stopped and resumed run must print."""
    cache = {}

    def get(processes: int, steps: int) -> dict[int, str]:
        if processes not in cache:
            folder = tmp_path_factory.mktemp(f"reference_{processes}")
            code, output = job(launched(processes, REPO / "train.py", *train_flags(folder, tiny_corpus, "--max_steps",
                                                                                    "5")), folder / "log.txt")
            assert code == 0, output[-3000:]
            cache[processes] = losses(output)
            if processes == 2:  # (checked here, where a plain `accelerate launch` started the run)
                [entry] = json.loads((folder / "run" / training.RUN_RECORD).read_text())
                assert entry["command"].startswith(" ".join(LAUNCH[:3])) and "train.py" in entry["command"]
                assert entry["processes"] == 2 and entry["flags"]["num_workers"] == 2
        assert sorted(cache[processes]) == list(range(1, 6))
        return {step: cache[processes][step] for step in steps}

    return get


# where the signal lands: the flags that make that moment come, and the step after which the run stops
MOMENTS = {"step": ([], 3), "checkpoint": (["--checkpoint_steps", "2"], 2),
           "validate": (["--validation_steps", "2"], 2)}


@pytest.mark.slow
@pytest.mark.parametrize("name, processes, how, where", [
    pytest.param("SIGINT", 1, "group", "step", id="SIGINT-1-process-mid-step"),
    pytest.param("SIGTERM", 1, "group", "checkpoint", id="SIGTERM-1-process-during-a-checkpoint-write"),
    pytest.param("SIGINT", 2, "group", "validate", id="SIGINT-2-processes-during-validation"),
    pytest.param("SIGTERM", 2, "every", "checkpoint", id="SIGTERM-to-every-process-2-processes-during-a-checkpoint"),
])
def test_a_stop_signal_to_the_job_saves_one_checkpoint_exits_0_and_the_run_resumes_exactly(
        tmp_path, tiny_corpus, reference_losses, name, processes, how, where):
    files = scripts(tmp_path)
    extra, stop = MOMENTS[where]
    flags = train_flags(tmp_path, tiny_corpus, "--max_steps", str(stop + 2), *extra)
    code, output = job(launched(processes, files["inject"], "train", *flags, watcher=files["watcher"]),
                       tmp_path / "stopped.txt", how=how, signal=name, where=where, at=3 if where == "step" else 1)
    run_dir = tmp_path / "run"
    check_stopped(code, output, name, processes, run_dir, stop)
    assert re.search(rf"step {stop}: checkpoint {re.escape(str(run_dir))}/checkpoint_{stop} written, [\d.]+ MB in "
                     r"[\d.]+ s", output)
    if where == "validate":
        assert f"step {stop}: validation cut short by {name}" in output
    assert sorted(losses(output)) == list(range(1, stop + 1))

    code, output = job(launched(processes, REPO / "train.py", *flags, "--resume_from_checkpoint", "latest"),
                       tmp_path / "resumed.txt")
    assert code == 0, output[-3000:]
    assert f"resumed from {run_dir / f'checkpoint_{stop}'} at step {stop}," in output
    resumed = losses(output)
    assert sorted(resumed) == [stop + 1, stop + 2]
    assert resumed == reference_losses(processes, sorted(resumed))
    # the run folder says how each start was made
    entries = json.loads((run_dir / training.RUN_RECORD).read_text())
    assert [entry["start_step"] for entry in entries] == [0, stop]
    assert entries[1]["flags"]["resume_from_checkpoint"] == "latest" and entries[0]["flags"]["num_workers"] == 2


def tacotron2_losses(output: str) -> dict[int, list[float]]:
    pattern = r"step (\d+) epoch \d+: loss (\S+) \(mel (\S+), post-net (\S+), gate (\S+)\)"
    return {int(m.group(1)): [float(x) for x in m.groups()[1:]] for m in re.finditer(pattern, output)}


@pytest.mark.slow
def test_tacotron2_stopped_by_sigterm_during_validation_saves_and_resumes_exactly(tmp_path, tiny_corpus):
    files = scripts(tmp_path)

    def flags(name: str) -> list[str]:
        return ["--experiment_name", name, "--working_directory", str(tmp_path), "--path_to_train_manifest",
                str(tiny_corpus[0]), "--path_to_val_manifest", str(tiny_corpus[1]), "--batch_size", "2",
                "--num_workers", "2", "--console_out_iters", "1", "--max_decoder_steps", "40", "--max_steps", "4",
                "--validation_steps", "2", "--checkpoint_epochs", "1000", *TACOTRON2_FLAGS]

    code, output = job([sys.executable, str(files["inject"]), "train_tacotron2", *flags("run")],
                       tmp_path / "stopped.txt", how="group", signal="SIGTERM", where="validate", at=1)
    check_stopped(code, output, "SIGTERM", 1, tmp_path / "run", 2)
    assert "step 2: validation cut short by SIGTERM" in output
    code, resumed = job([sys.executable, str(REPO / "train_tacotron2.py"), *flags("run"), "--resume_from_checkpoint",
                         "latest"], tmp_path / "resumed.txt")
    assert code == 0 and "at step 2," in resumed, resumed[-3000:]
    code, straight = job([sys.executable, str(REPO / "train_tacotron2.py"), *flags("straight")],
                         tmp_path / "straight.txt")
    assert code == 0, straight[-3000:]
    resumed, straight = tacotron2_losses(resumed), tacotron2_losses(straight)
    assert sorted(resumed) == [3, 4] and sorted(straight) == [1, 2, 3, 4]
    for step in (3, 4):
        assert np.allclose(resumed[step], straight[step], rtol=1e-3, atol=1e-4), (step, resumed, straight)


@pytest.mark.slow
def test_save_taco_mels_stopped_by_ctrl_c_on_two_processes_leaves_whole_files_and_a_rerun_completes(tmp_path):
    import save_taco_mels
    files = scripts(tmp_path)
    manifest = write_corpus(tmp_path, 8, seconds=0.3, name="clips")
    weights = tiny_tacotron2(tmp_path / "taco")
    common = ["--path_to_manifest", str(manifest), "--taco_weights", str(weights), "--batch_size", "2"]
    out = tmp_path / "mels"
    # Ctrl-C while rank 0 writes its second file: that file is finished, then the ranks stop.
    code, output = job([*LAUNCH, str(files["watcher"]), str(files["inject"]), "save_taco_mels", *common,
                        "--path_to_save", str(out)], tmp_path / "stopped.txt",
                       how="group", signal="SIGINT", where="write_npy", at=2)
    assert code == 128 + signal.SIGINT, output[-3000:]
    assert sorted(re.findall(r"rank (\d) exit status (-?\d+)", output)) == [("0", "0"), ("1", "0")], output[-3000:]
    left = int(re.search(r"stopped by SIGINT with (\d+) clip\(s\) left; run the same command again", output).group(1))
    written = sorted(out.glob("*.npy"))
    assert left >= 2 and len(written) == 8 - left and "Traceback" not in output
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".npy") == ["taco_mels.json"]  # no temporaries
    # A rerun (here on one process) writes the rest; with the uninterrupted run's mels.
    code, output = job([sys.executable, str(REPO / "save_taco_mels.py"), *common, "--path_to_save", str(out)],
                       tmp_path / "rerun.txt")
    assert code == 0 and f"wrote {left}, skipped {8 - left}, failed 0" in output, output[-3000:]
    torch.set_num_threads(1)
    assert save_taco_mels.main([*common, "--path_to_save", str(tmp_path / "straight")]) == 0
    for straight in sorted((tmp_path / "straight").glob("*.npy")):
        assert np.allclose(np.load(out / straight.name), np.load(straight), atol=1e-4), straight.name


# ---------------------------------------------------------------------------------------------- the parts

@pytest.fixture
def cpu_accelerator():
    import accelerate
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(4, 4))
    yield accelerator
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_loader_workers_ignore_stop_signals_yet_end_when_their_main_process_ends_them(cpu_accelerator):
    from torch.utils.data import DataLoader
    loader = DataLoader(list(range(64)), batch_size=2, num_workers=2, persistent_workers=True,
                        **training.signal_safe_workers(2))
    # what accelerate makes of the loader (prepare, and a resumed epoch's skip_first_batches) keeps both settings
    prepared = cpu_accelerator.prepare(loader)
    for derived in (prepared, cpu_accelerator.skip_first_batches(prepared, 1)):
        assert derived.worker_init_fn is loader.worker_init_fn
        assert derived.multiprocessing_context is loader.multiprocessing_context
    iterator = iter(loader)
    next(iterator)
    workers = list(iterator._workers)
    for name in ("SIGINT", "SIGTERM"):  # as a terminal or scheduler sends them: from another process
        for worker in workers:
            subprocess.run(["kill", "-s", name.removeprefix("SIG"), str(worker.pid)], check=True)
    assert [batch.tolist() for batch in itertools.islice(iterator, 4)] == [[2, 3], [4, 5], [6, 7], [8, 9]]
    assert all(worker.is_alive() for worker in workers)
    # The main process's own SIGTERM (multiprocessing at exit, a loader shutting down) still ends them, cleanly.
    workers[0].terminate()
    workers[0].join(timeout=HANG_TIMEOUT)
    assert workers[0].exitcode == 0
    iterator._shutdown_workers()
    assert not any(worker.is_alive() for worker in workers)


@pytest.fixture
def stop_signal():
    stop = training.StopSignal(announce=None)
    yield stop
    stop.restore()


def test_copies_of_a_stop_signal_are_one_stop_a_later_one_stops_at_once(stop_signal, monkeypatch):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)  # accelerate's launcher passes Ctrl-C on as SIGTERM
    os.kill(os.getpid(), signal.SIGINT)  # torchrun forwards it
    assert stop_signal.received == "SIGINT"
    monkeypatch.setattr(training.StopSignal, "REPEAT_SECONDS", 0.0)
    with stop_signal.protected():  # while a checkpoint is written, even a later one waits
        os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # after: the signal's usual effect
        os.kill(os.getpid(), signal.SIGINT)


def test_interrupting_raises_at_once_except_inside_a_write(stop_signal):
    with pytest.raises(training.Stopped):
        with stop_signal.interrupting():
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("not interrupted")
    stop = training.StopSignal(announce=None)
    written = []
    with pytest.raises(training.Stopped):
        with stop.interrupting():
            with stop.protected():
                os.kill(os.getpid(), signal.SIGTERM)
                written.append("the write finished")
            pytest.fail("not stopped after the write")
    stop.restore()
    assert written == ["the write finished"]


def test_one_process_agrees_on_its_own_flag_with_no_collective(stop_signal):
    class OneProcess:
        num_processes = 1

        def reduce(self, *args, **kwargs):
            raise AssertionError("no collective with one process")

    assert not stop_signal.agreed(OneProcess(), 1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop_signal.agreed(OneProcess(), 2)


def test_checkpoint_line_says_size_and_time_and_warns_when_a_launcher_would_kill_first(tmp_path, cpu_accelerator,
                                                                                      capsys, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "0")
    run = training.RunControl(cpu_accelerator, tmp_path, training.TrainState(step=7),
                              lambda folder: (folder / "generator.safetensors").write_bytes(b"g" * 1000),
                              max_steps=10, keep_last=2, checkpoint_steps=None, checkpoint_epochs=1,
                              validation_steps=10, validate=lambda: None)
    run.save()
    run.stop_signal.restore()
    said = capsys.readouterr().out
    size = sum(f.stat().st_size for f in (tmp_path / "checkpoint_7").rglob("*") if f.is_file())
    assert re.search(rf"step 7: checkpoint {re.escape(str(tmp_path))}/checkpoint_7 written, {size / 1e3:.0f} kB in "
                     r"[\d.]+ s", said), said
    assert "warning: writing a checkpoint took" in said and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=<seconds>" in said


def test_run_record_lists_each_start_with_every_flag_the_command_and_versions(tmp_path):
    import accelerate
    for step in (0, 40):
        training.record_run(tmp_path, REPO / "train.py", ["--batch_size", "4", "--config", "v2"],
                            {"batch_size": 4, "config": "v2", "learning_rate": 2e-4, "path": Path("x")}, 1, step)
    first, second = json.loads((tmp_path / training.RUN_RECORD).read_text())
    assert [first["start_step"], second["start_step"]] == [0, 40]
    assert first["script_command"] == f"python {REPO / 'train.py'} --batch_size 4 --config v2"
    assert first["flags"] == {"batch_size": 4, "config": "v2", "learning_rate": 2e-4, "path": "x"}
    assert first["versions"]["torch"] == torch.__version__ and first["versions"]["accelerate"] == accelerate.__version__
    assert len(first["git"]["commit"]) == 40 if first["git"] else True


@pytest.mark.parametrize("script, expected", [
    ("train", {"--config": "v1", "--batch_size": "16", "--learning_rate": "0.0002", "--num_workers": "4"}),
    ("train_tacotron2", {"--batch_size": "32", "--learning_rate": "0.001", "--fmax": "8000.0"}),
])
def test_help_names_each_default_once(script, expected, capsys):
    import importlib
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    blocks = re.split(r"\n  (?=--)", capsys.readouterr().out.split("\noptions:")[1])  # one per flag
    for block in blocks:
        assert len(re.findall(r"\bdefault\b", block, flags=re.IGNORECASE)) <= 1, block
    for flag, value in expected.items():
        block = next(block for block in blocks if block.startswith(flag + " "))
        assert f"default: {value}" in " ".join(block.split()), block
