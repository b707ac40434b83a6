"""train.py end to end: real accelerate launches (two CPU processes over gloo), resume, wandb offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_FLAGS
from safetensors.torch import load_file


def run_train(tmp_path: Path, corpus, *flags: str, name: str = "run", processes: int = 1,
              env: dict | None = None, script: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    train_manifest, test_manifest = corpus
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
    launch += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"] if processes > 1 else \
        ["--num_processes", "1"]
    command = launch + [str(script or REPO / "train.py"), "--experiment_name", name,
                        "--working_directory", str(tmp_path),
                        "--path_to_train_manifest", str(train_manifest), "--path_to_val_manifest", str(test_manifest),
                        "--batch_size", "2", "--num_workers", "0", "--console_out_iters", "1",
                        "--validation_steps", "1000", *TINY_FLAGS, *flags]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "WANDB_MODE": "disabled", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=600)
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_process_ddp_keeps_generators_identical(tmp_path, tiny_corpus):
    # A wrapper that trains, then dumps this rank's generator: the check must not trust train.py's own saving.
    wrapper = tmp_path / "train_and_dump.py"
    wrapper.write_text(
        f"import os, sys, torch\nsys.path.insert(0, {str(REPO)!r})\nimport train\n"
        "generator = train.main(sys.argv[1:])\n"
        "torch.save(generator.state_dict(), f'rank{os.environ[\"RANK\"]}.pt')\n")
    result = run_train(tmp_path, tiny_corpus, "--max_steps", "3", processes=2, script=wrapper)
    assert "on 2 process(es)" in result.stdout
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks: gradients were not synchronised"
    # and training actually moved the weights (the test would pass trivially on untouched models)
    exported = load_file(tmp_path / "run" / "generator.safetensors")
    assert exported["conv_post.bias"].abs().item() > 0


def test_resume_continues_exactly(tmp_path, tiny_corpus):
    # 4 steps per epoch (8 clips, batch 2): stop at 6 (mid-epoch) and resume to 10, vs 10 straight.
    run_train(tmp_path, tiny_corpus, "--max_steps", "10", name="straight")
    first = run_train(tmp_path, tiny_corpus, "--max_steps", "6", name="resumed")
    assert (tmp_path / "resumed" / "checkpoint_6" / "checkpoint_complete").exists()
    second = run_train(tmp_path, tiny_corpus, "--max_steps", "10", "--resume_from_checkpoint", "latest",
                       name="resumed")
    assert "at step 6, epoch 1" in second.stdout
    assert "step 7 epoch 1" in second.stdout + second.stderr and "step 1 epoch" not in second.stdout + second.stderr
    assert "step 6 epoch 1" in first.stdout + first.stderr
    straight = load_file(tmp_path / "straight" / "checkpoint_10" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoint_10" / "model.safetensors")
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), f"{key}: resumed run diverged"
    # learning rate decayed once per finished epoch: 2 epochs done at step 10 in both runs
    scheduler = torch.load(tmp_path / "resumed" / "checkpoint_10" / "scheduler.bin", weights_only=True)
    assert scheduler["last_epoch"] == 2
    assert len(list((tmp_path / "resumed").glob("checkpoint_*"))) <= 3
    # resuming with another architecture: one line that names the checkpoint, not accelerate's stack trace
    wrong = run_train(tmp_path, tiny_corpus, "--max_steps", "12", "--resume_from_checkpoint", "latest",
                      "--upsample_initial_channel", "8", name="resumed", check=False)
    assert wrong.returncode == 1 and "RuntimeError" not in wrong.stderr  # (accelerate launch adds its own trace)
    assert re.search(r"cannot resume from \S*checkpoint_10: it does not fit", wrong.stderr), wrong.stderr[-2000:]
    message = next(line for line in wrong.stderr.splitlines() if line.startswith("error: cannot resume"))
    assert "size mismatch for" in message and "trained with upsample_initial_channel 16 (now 8)). Resume" in message


def test_wandb_offline_logs_scalars_audio_and_mel_images(tmp_path, tiny_corpus):
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "HOME": str(tmp_path), "WANDB_DIR": ""}
    env = {k: v for k, v in env.items() if v}  # unset WANDB_MODE: train.py must pick offline by itself
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    train_manifest, test_manifest = tiny_corpus
    command = [sys.executable, str(REPO / "train.py"), "--experiment_name", "wb", "--working_directory",
               str(tmp_path), "--path_to_train_manifest", str(train_manifest), "--path_to_val_manifest",
               str(test_manifest), "--batch_size", "2", "--num_workers", "0", "--max_steps", "4",
               "--wandb_log_iters", "2", "--validation_steps", "4", "--num_audio_samples", "1", "--log_wandb",
               *TINY_FLAGS]
    result = subprocess.run(command, capture_output=True, text=True, env={**environment, **env}, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb is offline" in result.stdout
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # wandb-core writes no summary json offline; the run's record log holds the history rows as protobuf
    # with the keys in clear: scalars were logged at steps 2 and 4, validation at step 4.
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert records.count(b"train/loss_mel") >= 2 and b"val/mel_error" in records
    media = list((runs[0] / "files" / "media").rglob("*"))
    assert any(p.suffix == ".wav" for p in media) and any(p.suffix == ".png" for p in media)
    # resumed: the same wandb run (same id) continues its curves
    command[command.index("--max_steps") + 1] = "6"
    resumed = subprocess.run(command + ["--resume_from_checkpoint", "latest"], capture_output=True, text=True,
                             env={**environment, **env}, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({run.name.rsplit("-", 1)[1] for run in runs}) == 1, runs


def test_tensorboard_logs_scalars_audio_and_mel_images(tmp_path, tiny_corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_train(tmp_path, tiny_corpus, "--max_steps", "2", "--report_to", "tensorboard", "--wandb_log_iters", "1",
              "--validation_steps", "2", "--num_audio_samples", "1", name="tb")
    event_files = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert event_files, list((tmp_path / "tb").rglob("*"))
    events = EventAccumulator(str(event_files[0].parent), size_guidance={"audio": 0, "images": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss_mel", "val/mel_error"} <= set(tags["scalars"])
    assert "val/audio_0" in tags["audio"] and "val/mel_0" in tags["images"]


def test_bad_flags_and_fake_multiprocess_launch_fail_with_one_line(tmp_path, tiny_corpus):
    train_manifest, test_manifest = tiny_corpus
    base = [sys.executable, str(REPO / "train.py"), "--experiment_name", "x", "--working_directory", str(tmp_path),
            "--path_to_train_manifest", str(train_manifest), "--path_to_val_manifest", str(test_manifest),
            "--num_workers", "0"]
    result = subprocess.run(base + ["--upsample_rates", "8", "8", "2"], capture_output=True, text=True)
    assert result.returncode == 1 and "must upsample each mel frame by --hop_size 256" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run(base + ["--finetune"], capture_output=True, text=True)
    assert result.returncode == 2 and "--path_to_saved_mels" in result.stderr
    # what `accelerate launch --multi_gpu` without GPUs and ACCELERATE_USE_CPU produces: WORLD_SIZE=2, one process
    result = subprocess.run(base + ["--max_steps", "1", *TINY_FLAGS], capture_output=True, text=True,
                            env={**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    assert result.returncode == 1 and "ACCELERATE_USE_CPU=1" in result.stderr


@pytest.mark.parametrize("text", ["((1,3,5),(1,3,5))", "[[1,2],[2,6]]"])
def test_dilation_flag_parses_without_eval(text):
    sys.path.insert(0, str(REPO))
    import train
    assert train.nested_int_tuple(text)[1][1] in (3, 6)
    with pytest.raises(Exception, match="nested integer"):
        train.nested_int_tuple("__import__('os').system('true')")


def write_teacher_forced_mels(folder: Path, manifest: Path) -> None:
    """Stand-in for save_taco_mels.py: the ground-truth mel plus a small offset, frame-aligned per DESIGN §4."""
    sys.path.insert(0, str(REPO))
    from model import HifiGanConfig
    from utils import load_audio, mel_spectrogram, read_manifest
    folder.mkdir(parents=True, exist_ok=True)
    for row in read_manifest(manifest):
        mel = mel_spectrogram(torch.from_numpy(load_audio(row.audio_path, 22050)), **HifiGanConfig().mel_kwargs())
        np.save(folder / (Path(row.audio_path).stem + ".npy"), (mel + 0.1).numpy())


def test_finetune_starts_from_pretrained_weights_and_trains(tmp_path, tiny_corpus):
    run_train(tmp_path, tiny_corpus, "--max_steps", "2", name="pretrain")
    mels = tmp_path / "mels"
    write_teacher_forced_mels(mels, tiny_corpus[0])
    write_teacher_forced_mels(mels, tiny_corpus[1])
    pretrained = tmp_path / "pretrain" / "checkpoint_2"
    # the run folder, as the README's recipe passes it: its newest checkpoint, discriminators included
    finetune = ["--finetune", "--path_to_saved_mels", str(mels), "--path_to_pretrained_weights",
                str(tmp_path / "pretrain")]
    result = run_train(tmp_path, tiny_corpus, *finetune, "--max_steps", "0", name="ft0")
    assert f"generator and discriminators from {pretrained}" in result.stdout
    for name in ("model", "model_1", "model_2"):  # before the first step: exactly the pretrained weights
        before, loaded = load_file(pretrained / f"{name}.safetensors"), load_file(tmp_path / "ft0" / "checkpoint_0" /
                                                                                   f"{name}.safetensors")
        assert all(torch.equal(before[k], loaded[k]) for k in before)
    run_train(tmp_path, tiny_corpus, *finetune, "--max_steps", "2", name="ft")
    trained = load_file(tmp_path / "ft" / "checkpoint_2" / "model.safetensors")
    start = load_file(pretrained / "model.safetensors")
    assert any(not torch.equal(start[k], trained[k]) for k in start)


def test_finetune_from_official_generator_and_discriminator_files(tmp_path, tiny_corpus):
    sys.path.insert(0, str(REPO))
    import train
    from model import Generator, MultiPeriodDiscriminator, MultiScaleDiscriminator, to_official_names
    args = train.parse_args(["--experiment_name", "x", "--working_directory", "w", "--path_to_train_manifest", "a",
                             "--path_to_val_manifest", "b", *TINY_FLAGS])
    config = train.build_config(args)
    source = (Generator(config), MultiPeriodDiscriminator((2, 3), 8), MultiScaleDiscriminator(8))
    torch.save({"generator": to_official_names(source[0].state_dict())}, tmp_path / "g_00001000")
    torch.save({"mpd": to_official_names(source[1].state_dict()), "msd": to_official_names(source[2].state_dict())},
               tmp_path / "do_00001000")
    target = (Generator(config), MultiPeriodDiscriminator((2, 3), 8), MultiScaleDiscriminator(8))
    message = train.load_pretrained(str(tmp_path / "g_00001000"), *target)
    assert "do_00001000" in message
    for a, b in zip(source, target):
        for key, value in a.state_dict().items():
            assert torch.allclose(value, b.state_dict()[key]), key


def test_finetune_refuses_missing_mels_at_startup(tmp_path, tiny_corpus):
    (tmp_path / "empty").mkdir()
    command = [sys.executable, str(REPO / "train.py"), "--experiment_name", "x", "--working_directory", str(tmp_path),
               "--path_to_train_manifest", str(tiny_corpus[0]), "--path_to_val_manifest", str(tiny_corpus[1]),
               "--finetune", "--path_to_saved_mels", str(tmp_path / "empty"), "--path_to_pretrained_weights",
               str(tmp_path), *TINY_FLAGS]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and "8 of 8 clips" in result.stderr and "save_taco_mels" in result.stderr


def test_resume_with_another_batch_size_skips_the_clips_already_seen():
    from train import TrainState
    # a checkpoint from before the field existed: 4 batches an epoch, 2 of epoch 1 done
    assert TrainState(step=6, epoch=1).start_epoch_at(steps_per_epoch=4, global_batch_size=2) == 2
    # 2 batches of 2 clips seen; resumed at 4 clips a batch: 1 batch done; at 1 clip a batch: 4
    state = TrainState(step=6, epoch=1, epoch_start_step=4, global_batch_size=2)
    assert state.start_epoch_at(steps_per_epoch=2, global_batch_size=4) == 1
    assert (state.epoch_start_step, state.global_batch_size) == (5, 4)
    assert TrainState(step=6, epoch=1, epoch_start_step=4, global_batch_size=2).start_epoch_at(8, 1) == 4
    # more seen than today's epoch holds: the epoch is over
    assert TrainState(step=12, epoch=1, epoch_start_step=4, global_batch_size=2).start_epoch_at(2, 4) == 2
