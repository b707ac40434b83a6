"""Fault injection: bad data, non-finite losses, kill -9 mid-checkpoint, malicious pickles, determinism (stop signals:
test_stop_signals.py)."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import HANG_TIMEOUT, REPO, TINY_CONFIG, TINY_FLAGS, synth_clip, write_corpus
from safetensors.torch import load_file

from model import load_generator
from utils import UserError, mel_spectrogram


def train_command(tmp_path: Path, corpus, *flags: str, name: str = "run", script: Path | None = None) -> list[str]:
    return [sys.executable, str(script or REPO / "train.py"), "--experiment_name", name,
            "--working_directory", str(tmp_path), "--path_to_train_manifest", str(corpus[0]),
            "--path_to_val_manifest", str(corpus[1]), "--batch_size", "2", "--num_workers", "0",
            "--console_out_iters", "1", "--validation_steps", "1000", *TINY_FLAGS, *flags]


def run(command: list[str], expect: int = 0, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", **kwargs.pop("env", {})}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT, **kwargs)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def losses(output: str) -> dict[int, str]:
    """step -> the console's loss line (gen, disc, mel), for comparing runs."""
    pattern = r"step (\d+) epoch \d+: (gen \S+ disc \S+ mel \S+)"
    return {int(m.group(1)): m.group(2) for m in re.finditer(pattern, output)}


def wrapper(tmp_path: Path, body: str) -> Path:
    """A script that patches train.py's module before running it: faults injected from outside the code under test."""
    path = tmp_path / "wrapped_train.py"
    path.write_text(f"import os, signal, sys, torch\nsys.path.insert(0, {str(REPO)!r})\nimport train\n{body}\n"
                    "try:\n    train.main(sys.argv[1:])\nexcept train.UserError as error:\n"
                    "    print(f'error: {error}', file=sys.stderr)\n    sys.exit(1)\n")
    return path


# ---------------------------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    train = write_corpus(folder, 6)
    test = write_corpus(folder, 1, name="test")
    wavs = folder / "wavs"
    (wavs / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    (wavs / "empty.wav").write_bytes(b"")
    sf.write(wavs / "zero_samples.wav", np.zeros(0, np.float32), 22050)
    sf.write(wavs / "too_short.wav", synth_clip(0.005), 22050)  # 110 samples < one hop
    nan_clip = synth_clip(0.5, sampling_rate=44100)  # another rate too: resampling must not choke on NaN
    nan_clip[::7], nan_clip[3::11], nan_clip[5::13] = np.nan, np.inf, -np.inf
    sf.write(wavs / "nan.wav", nan_clip, 44100, subtype="FLOAT")
    sf.write(wavs / "silent.wav", np.zeros(11025, np.float32), 22050)
    rows = ["corrupt", "empty", "zero_samples", "too_short", "nan", "silent", "missing"]
    with open(train, "a") as handle:
        handle.writelines(f"wavs/{name}.wav,bad clip\n" for name in rows)
    return train, test


@pytest.mark.slow
def test_bad_rows_reported_together_at_startup(tmp_path, bad_corpus):
    result = run(train_command(tmp_path, bad_corpus, "--max_steps", "1"), expect=1)
    first_line = result.stderr.strip().splitlines()[0]
    assert first_line.startswith("error: 5 bad rows in") and "--skip_bad_files" in first_line
    for name in ("corrupt.wav: unreadable", "empty.wav: unreadable", "zero_samples.wav: no audio samples",
                 "too_short.wav: 0.0050 s long", "missing.wav: file does not exist"):
        assert name in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_skip_bad_files_trains_and_nan_or_silent_audio_gives_finite_losses(tmp_path, bad_corpus):
    # batch of 2 over 8 kept clips (6 good + nan + silent) for 8 steps: every clip is seen
    result = run(train_command(tmp_path, bad_corpus, "--max_steps", "8", "--skip_bad_files"))
    assert "dropped 5 bad rows" in result.stderr and "kept 8" in result.stderr
    lines = losses(result.stdout + result.stderr)
    assert len(lines) == 8 and all("nan" not in line and "inf" not in line for line in lines.values())
    assert "non-finite" not in result.stdout + result.stderr


def test_dataset_items_of_nan_silent_and_short_audio_are_finite(bad_corpus):
    from dataset import MelDataset
    from model import HifiGanConfig
    dataset = MelDataset(bad_corpus[0], HifiGanConfig(), 2048, skip_bad_files=True)
    for train in (True, False):
        dataset.train = train
        for index in range(len(dataset)):
            for tensor in dataset[index]:
                assert torch.isfinite(tensor).all()
    short = bad_corpus[0].parent / "short.csv"
    sf.write(bad_corpus[0].parent / "wavs" / "short300.wav", synth_clip(0.0136), 22050)  # 300 samples: 1 hop
    short.write_text("file_path\nwavs/short300.wav\n")
    dataset = MelDataset(short, HifiGanConfig(), 2048, train=False)
    mel, audio, loss_mel = dataset[0]
    assert mel.shape == (80, 1) and len(audio) == 256 and torch.isfinite(loss_mel).all()


def test_nonfinite_steps_under_an_fp16_grad_scaler_leave_weights_and_lower_the_scale(monkeypatch):
    # fp16 needs a GPU for accelerate to make its GradScaler; give the CPU one the same scaler by hand.
    import accelerate
    from accelerate.state import AcceleratorState, GradientState

    import hifigan.losses
    import model
    from model import Generator, MultiPeriodDiscriminator, MultiScaleDiscriminator
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    generator = Generator(TINY_CONFIG)
    mpd, msd = MultiPeriodDiscriminator((2, 3), 8), MultiScaleDiscriminator(8)
    optim_g = torch.optim.AdamW(generator.parameters(), 1e-3)
    optim_d = torch.optim.AdamW([*mpd.parameters(), *msd.parameters()], 1e-3)
    generator, mpd, msd, optim_g, optim_d = accelerator.prepare(generator, mpd, msd, optim_g, optim_d)
    accelerator.native_amp, accelerator.state._mixed_precision = True, "fp16"  # so that it unscales as on a GPU
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    audio = torch.from_numpy(synth_clip(2048 / 22050)).unsqueeze(0)
    mel = mel_spectrogram(audio, **TINY_CONFIG.mel_kwargs())
    # train_step looks its losses up in hifigan.losses (model only re-exports them)
    monkeypatch.setattr(hifigan.losses, "mel_loss", lambda a, b: (a - b).abs().mean() * float("nan"))  # NaN grads
    for _ in range(2):  # twice: the second step must not find the scaler stale
        result = model.train_step(accelerator, generator, mpd, msd, optim_g, optim_d, mel, audio, mel,
                                  TINY_CONFIG.mel_kwargs(for_loss=True))
        assert not result["generator_stepped"]
    changed = [k for k, v in generator.state_dict().items() if not torch.equal(before[k], v)]
    assert not changed, (changed, accelerator.scaler.get_scale())
    assert accelerator.scaler.get_scale() < 2.0**16
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_ten_minute_validation_clip_is_validated_in_bounded_chunks(tmp_path):
    # The loader reads the clip whole; validate() never hands the generator more than a chunk of it.
    folder = tmp_path / "long"
    (folder / "wavs").mkdir(parents=True)
    sf.write(folder / "wavs" / "long.wav", np.tile(synth_clip(1.0), 600), 22050, subtype="PCM_16")
    (folder / "m.csv").write_text("file_path\nwavs/long.wav\n")
    from torch.utils.data import DataLoader

    import train
    from dataset import MelDataset
    from model import Generator
    config = TINY_CONFIG
    dataset = MelDataset(folder / "m.csv", config, 2048, train=False)
    generator = Generator(config)
    frames_seen = []
    generator.register_forward_pre_hook(lambda module, inputs: frames_seen.append(inputs[0].shape[-1]))
    error, _ = train.validate(generator, DataLoader(dataset, batch_size=1), config, torch.device("cpu"), 0)
    total_frames = 600 * 22050 // 256
    assert max(frames_seen) <= train.VALIDATION_CHUNK_FRAMES + 2 * 16 < total_frames
    assert sum(frames_seen) >= total_frames and math.isfinite(error)


# ------------------------------------------------------------------------------------ training faults

@pytest.mark.slow
def test_nonfinite_loss_skips_the_step_and_too_many_stop_the_run(tmp_path, tiny_corpus):
    # Steps 2 and 3 get a NaN mel loss: skipped (weights untouched), counted; the run goes on.
    script = wrapper(tmp_path, "import hifigan.losses\ncalls = [0]\noriginal = hifigan.losses.mel_loss\n"
                     "def poisoned(a, b):\n    calls[0] += 1\n"
                     "    return original(a, b) * (float('nan') if calls[0] in (2, 3) else 1.0)\n"
                     "hifigan.losses.mel_loss = poisoned\n")
    result = run(train_command(tmp_path, tiny_corpus, "--max_steps", "4", "--checkpoint_steps", "1",
                               "--keep_last_checkpoints", "10", script=script))
    output = result.stdout + result.stderr
    assert "step 2: non-finite loss or gradient, generator step skipped (1 in a row)" in output
    assert "step 3: non-finite loss or gradient, generator step skipped (2 in a row)" in output
    after_1 = load_file(tmp_path / "run" / "checkpoint_1" / "model.safetensors")
    after_3 = load_file(tmp_path / "run" / "checkpoint_3" / "model.safetensors")
    after_4 = load_file(tmp_path / "run" / "checkpoint_4" / "model.safetensors")
    assert all(torch.equal(after_1[k], after_3[k]) for k in after_1)  # steps 2-3 touched nothing
    assert any(not torch.equal(after_3[k], after_4[k]) for k in after_3)  # step 4 trained again
    assert all(torch.isfinite(v).all() for v in after_4.values())

    # Always NaN: stop after --max_nonfinite_steps in a row, with the state saved and advice given.
    script = wrapper(tmp_path, "import hifigan.losses\n"
                     "hifigan.losses.mel_loss = lambda a, b: (a - b).abs().mean() * float('nan')\n")
    result = run(train_command(tmp_path, tiny_corpus, "--max_steps", "50", "--max_nonfinite_steps", "3",
                               name="nan", script=script), expect=1)
    assert "3 steps in a row had a non-finite loss" in result.stderr and "--learning_rate" in result.stderr
    assert (tmp_path / "nan" / "checkpoint_3" / "checkpoint_complete").exists()


# SIGINT / SIGTERM to the job (1 and 2 processes, DataLoader workers, mid-step, validation, checkpoint write):
# tests/test_stop_signals.py


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint_keeps_the_last_complete_one(tmp_path, tiny_corpus):
    # SIGKILL ourselves in the middle of the second checkpoint: after accelerate wrote its files into the
    # temporary folder, before the generator export, marker and rename.
    script = wrapper(tmp_path, "saves = [0]\noriginal = train.save_generator\n"
                     "def dying(*args):\n    saves[0] += 1\n"
                     "    if saves[0] == 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
                     "    return original(*args)\ntrain.save_generator = dying\n")
    result = subprocess.run(train_command(tmp_path, tiny_corpus, "--max_steps", "10", "--checkpoint_steps", "2",
                                          script=script), capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoint_2" / "checkpoint_complete").exists()
    assert (run_dir / ".tmp_checkpoint_4").exists() and not (run_dir / "checkpoint_4").exists()
    resumed = run(train_command(tmp_path, tiny_corpus, "--max_steps", "5", "--resume_from_checkpoint", "latest"))
    output = resumed.stdout + resumed.stderr
    assert "ignoring incomplete checkpoint" in output and "at step 2," in output and "step 3 epoch" in output
    # a partial folder named like a real one (no marker) is not 'latest' either
    (run_dir / "checkpoint_99").mkdir()
    resumed = run(train_command(tmp_path, tiny_corpus, "--max_steps", "6", "--resume_from_checkpoint", "latest"))
    assert "at step 5," in resumed.stdout


@pytest.mark.slow
def test_same_seed_same_losses_and_again_across_a_resume(tmp_path, tiny_corpus):
    # Run a: 20 steps straight. Run b: the same seed and data, stopped at 10 and resumed to 20.
    # Its 20 console loss lines must equal a's: identical across runs, and across the resume.
    def console(result: subprocess.CompletedProcess) -> str:
        return result.stdout + result.stderr

    straight = losses(console(run(train_command(tmp_path, tiny_corpus, "--max_steps", "20", name="a"))))
    first_half = losses(console(run(train_command(tmp_path, tiny_corpus, "--max_steps", "10", name="b"))))
    second_half = losses(console(run(train_command(tmp_path, tiny_corpus, "--max_steps", "20",
                                                   "--resume_from_checkpoint", "latest", name="b"))))
    assert sorted(straight) == list(range(1, 21))
    assert sorted(first_half) == list(range(1, 11)) and sorted(second_half) == list(range(11, 21))
    assert {**first_half, **second_half} == straight


# ------------------------------------------------------------------------------------ checkpoint safety

class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    torch.save({"generator": Exploit()}, tmp_path / "g_00000001")
    with pytest.raises(UserError, match="refusing to load"):
        load_generator(tmp_path / "g_00000001")
    assert not marker.exists()


@pytest.mark.slow
def test_persistent_workers_see_each_epoch_and_match_the_main_process(tmp_path, tiny_corpus):
    # 4 steps per epoch: 10 steps span 3 epochs. Persistent workers keep their own dataset copy; the
    # epoch reaches them through shared memory, so the crops (hence losses) equal the worker-less run's.
    def console(result: subprocess.CompletedProcess) -> str:
        return result.stdout + result.stderr

    in_main = losses(console(run(train_command(tmp_path, tiny_corpus, "--max_steps", "10", name="main"))))
    with_workers = losses(console(run(train_command(tmp_path, tiny_corpus, "--max_steps", "10", "--num_workers", "2",
                                                    name="workers"))))
    assert sorted(in_main) == list(range(1, 11)) and in_main == with_workers


def test_latest_skips_checkpoint_folders_without_their_completion_marker(tmp_path, capsys):
    import training
    for step, complete in ((3, True), (5, False)):
        (tmp_path / f"checkpoint_{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint_{step}" / training.COMPLETE_MARKER).write_text("3")
    (tmp_path / ".tmp_checkpoint_6").mkdir()
    assert training.find_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint_3"
    said = capsys.readouterr().out
    assert f"ignoring {tmp_path / 'checkpoint_5'}: it has no" in said and ".tmp_checkpoint_6" in said
    with pytest.raises(UserError, match="not a complete checkpoint folder"):
        training.find_resume_checkpoint(str(tmp_path / "checkpoint_5"), tmp_path)


# ------------------------------------------------------------------------------------ spreadsheet manifests

def test_manifests_saved_by_a_spreadsheet_with_bom_and_crlf_are_read(tmp_path):
    from utils import read_manifest
    (tmp_path / "wavs").mkdir()
    for name in ("a", "LJ001-0001", "LJ001-0002"):
        sf.write(tmp_path / "wavs" / f"{name}.wav", synth_clip(0.1), 22050)
    csv_manifest = tmp_path / "train.csv"
    csv_manifest.write_bytes('\ufeff"file_path","normalized_transcript"\r\nwavs/a.wav,"Hello, there"\r\n'
                             .encode("utf-8"))
    lj_manifest = tmp_path / "metadata.csv"
    lj_manifest.write_bytes("\ufeffLJ001-0001|Dr. Smith|Doctor Smith\r\nLJ001-0002|only raw|\r\n".encode("utf-8"))
    csv_rows, lj_rows = read_manifest(csv_manifest), read_manifest(lj_manifest)
    assert [(Path(r.audio_path).name, r.transcript) for r in csv_rows] == [("a.wav", "Hello, there")]
    assert [(Path(r.audio_path).name, r.transcript) for r in lj_rows] == [("LJ001-0001.wav", "Doctor Smith"),
                                                                          ("LJ001-0002.wav", "only raw")]
    for row in csv_rows + lj_rows:
        assert not {"\r", "\ufeff"} & set(row.audio_path + row.transcript)


# ------------------------------------------------------------------------------------ full disk

def full_disk_error(kind: str) -> Exception:
    """What the writers raise on ENOSPC (see training._WRITE_FAILURE_MARKERS): Python, safetensors, torch.save."""
    import errno

    from safetensors import SafetensorError
    if kind == "oserror":
        return OSError(errno.ENOSPC, "No space left on device")
    if kind == "safetensors":
        return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    try:
        raise RuntimeError("basic_ios::clear: iostream error")
    except RuntimeError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        except RuntimeError as error:
            return error


@pytest.fixture
def tiny_accelerator():
    """A real cpu Accelerator with a prepared model and optimizer that has state (one step taken)."""
    import accelerate
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True)
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(4, 256)).square().mean().backward()
    optimizer.step()
    yield accelerator
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def stated_bytes(message: str, pattern: str) -> float:
    number, unit = re.search(pattern + r"([\d.]+) (kB|MB|GB)", message).groups()
    return float(number) * {"kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def export_stub(folder: Path) -> None:
    (folder / "generator.safetensors").write_bytes(b"g" * 1000)


@pytest.mark.parametrize("kind", ["oserror", "safetensors", "torch"])
def test_full_disk_while_saving_removes_the_partial_folder_and_says_so_in_one_line(tmp_path, tiny_accelerator,
                                                                                   monkeypatch, kind):
    import training
    run_dir = tmp_path / "run"
    (run_dir / ".tmp_checkpoint_1").mkdir(parents=True)  # a killed run's leftover
    (run_dir / ".tmp_checkpoint_1" / "junk.bin").write_bytes(b"x" * 100)
    good = training.save_checkpoint(tiny_accelerator, run_dir, training.TrainState(step=2), 3, export_stub)
    assert (good / training.COMPLETE_MARKER).exists() and not (run_dir / ".tmp_checkpoint_1").exists()
    before = folder_contents(good)

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # after model.safetensors: the optimizer file fails half-written
        Path(f).write_bytes(b"\0" * 4096)
        raise full_disk_error(kind)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError) as caught:
        training.save_checkpoint(tiny_accelerator, run_dir, training.TrainState(step=4), 3, export_stub)
    message = str(caught.value)
    assert "\n" not in message and str(run_dir / ".tmp_checkpoint_4") in message
    assert ("torch.save failed: unexpected pos 704 vs 598 (basic_ios::clear: iostream error)" if kind == "torch" else
            "No space left on device") in message and "enforce fail" not in message
    size = sum(len(data) for data in before.values())
    assert abs(stated_bytes(message, "needs about ") - size) <= 0.06 * size
    assert stated_bytes(message, ", (?:only )?") > 0 and " is free there" in message
    assert f"last complete checkpoint {good} with --resume_from_checkpoint latest" in message
    assert not list(run_dir.glob(".tmp_checkpoint_*")) and not (run_dir / "checkpoint_4").exists()
    assert folder_contents(good) == before

    # No complete checkpoint yet: the size is what was written before the failure, and it says there is none.
    with pytest.raises(UserError) as caught:
        training.save_checkpoint(tiny_accelerator, tmp_path / "fresh", training.TrainState(step=2), 3, export_stub)
    message = str(caught.value)
    written = (good / "model.safetensors").stat().st_size + 4096
    assert abs(stated_bytes(message, "needs about ") - written) <= 0.06 * written and "or more" in message
    assert "no complete checkpoint to resume from" in message and not list((tmp_path / "fresh").iterdir())
    monkeypatch.setattr(torch, "save", real_save)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE/SIGXFSZ as on Linux")
@pytest.mark.parametrize("limit, writer", [(100_000, "safetensors"), (400_000, "torch")])
def test_what_the_real_writers_raise_when_a_write_fails_is_caught(tmp_path, tiny_accelerator, limit, writer):
    # A file-size limit makes the real writers fail mid-file (EFBIG, as ENOSPC would): model.safetensors
    # (262 kB) under 100 kB, optimizer.bin (525 kB, torch.save) under 400 kB. No patching.
    import resource

    import training
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of failing write()
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(UserError) as caught:
            training.save_checkpoint(tiny_accelerator, tmp_path, training.TrainState(step=2), 3, export_stub)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    message = str(caught.value)
    assert ("File too large (os error 27)" if writer == "safetensors" else "iostream error") in message, message
    assert "\n" not in message and not list(tmp_path.glob(".tmp_checkpoint_*"))


def test_resuming_removes_a_killed_runs_partial_checkpoints(tmp_path, capsys):
    import training
    (tmp_path / ".tmp_checkpoint_6").mkdir()
    (tmp_path / ".tmp_checkpoint_6" / "optimizer.bin").write_bytes(b"x" * 1000)
    assert training.find_resume_checkpoint("latest", tmp_path) is None
    assert not (tmp_path / ".tmp_checkpoint_6").exists()
    assert "ignoring incomplete checkpoint" in capsys.readouterr().out


FULL_DISK_AT_STEP_4 = """import errno
real_save = torch.save
def full_disk(obj, f, *args, **kwargs):
    if '.tmp_checkpoint_4' in str(f) and str(f).endswith({file!r}):
        with open(f, 'wb') as handle:
            handle.write(b'\\0' * 4096)
        raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(obj, f, *args, **kwargs)
torch.save = full_disk
"""


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_stops_with_one_line_and_resumes_after(tmp_path, tiny_corpus):
    script = wrapper(tmp_path, FULL_DISK_AT_STEP_4.format(file="optimizer.bin"))
    result = run(train_command(tmp_path, tiny_corpus, "--max_steps", "6", "--checkpoint_steps", "2",
                               script=script), expect=1)
    run_dir = tmp_path / "run"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith(f"error: could not write checkpoint_4 into {run_dir / '.tmp_checkpoint_4'} "
                                "(No space left on device)")
    assert f"from the last complete checkpoint {run_dir / 'checkpoint_2'} with --resume_from_checkpoint latest" \
        in errors[0] and " is free there" in errors[0]
    assert not list(run_dir.glob(".tmp_checkpoint_*")) and not (run_dir / "checkpoint_4").exists()
    assert (run_dir / "checkpoint_2" / "checkpoint_complete").exists()
    # after freeing space: the plain command resumes from checkpoint_2 and finishes
    resumed = run(train_command(tmp_path, tiny_corpus, "--max_steps", "6", "--checkpoint_steps", "2",
                                "--resume_from_checkpoint", "latest"))
    output = resumed.stdout + resumed.stderr
    assert "at step 2," in output and "step 3 epoch" in output
    assert (run_dir / "checkpoint_6" / "checkpoint_complete").exists() and (run_dir / "generator.safetensors").exists()


@pytest.mark.slow
def test_full_disk_on_another_rank_stops_both_ranks_without_a_hang(tmp_path, tiny_corpus):
    # Rank 1 fails to write only its own RNG file: the main process must learn it (collective), not rename an
    # incomplete checkpoint, and both ranks must exit instead of one waiting in a barrier.
    script = wrapper(tmp_path, FULL_DISK_AT_STEP_4.format(file="random_states_1.pkl"))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "--num_cpu_threads_per_process", "1"]
    result = run(launch + train_command(tmp_path, tiny_corpus, "--max_steps", "6", "--checkpoint_steps", "2",
                                        script=script)[1:], expect=1, env={"ACCELERATE_USE_CPU": "1"})
    run_dir = tmp_path / "run"
    assert f"error: could not write checkpoint_4 into {run_dir / '.tmp_checkpoint_4'} (it failed on another " \
           "process)" in result.stderr
    assert "error: process 1: writing checkpoint_4 failed (No space left on device)" in result.stderr
    assert not list(run_dir.glob(".tmp_checkpoint_*")) and not (run_dir / "checkpoint_4").exists()
    assert (run_dir / "checkpoint_2" / "checkpoint_complete").exists()
