"""train.py end to end: real accelerate launches (two CPU processes over gloo), resume, wandb offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_TIMEOUT, REPO, TINY_FLAGS
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
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path,
                            timeout=HANG_TIMEOUT)
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def script_stderr(stderr: str) -> str:
    """The training script's own stderr under `accelerate launch`, without the launcher's wrapper around a failure.

    accelerate 1.16 tees the script's stderr through, then raises CalledProcessError from RuntimeError(<that stderr's
    tail>): `RuntimeError: <a repeat of the script's last lines>`, "The above exception was the direct cause ...", and
    a traceback through accelerate/commands/launch.py. Earlier versions appended that last traceback alone.
    """
    start = stderr.rfind("Traceback (most recent call last):")
    if start < 0 or "subprocess.CalledProcessError" not in stderr[start:]:
        return stderr  # the launcher added nothing
    own = stderr[:start]
    cause = re.search(r"\n*The above exception was the direct cause of the following exception:\s*$", own)
    if cause:
        own = own[:cause.start()]
        for match in re.finditer(r"(?m)^RuntimeError: ", own):  # the cause's message repeats the script's last lines
            if own[:match.start()].rstrip("\n").endswith(own[match.end():].rstrip("\n")):
                return own[:match.start()]
    return own


@pytest.mark.slow
def test_script_stderr_is_exactly_what_the_script_printed(tmp_path):
    # Real launches, so that a change in what accelerate appends shows here: a clean error keeps its one line,
    # a script's own traceback is kept whole.
    for name, body, expected in [
            ("clean", "print('warning: w', file=sys.stderr)\nprint('error: e', file=sys.stderr)\nsys.exit(1)\n",
             "warning: w\nerror: e\n"),
            ("crash", "print('warning: w', file=sys.stderr)\nraise RuntimeError('boom')\n", None)]:
        script = tmp_path / f"{name}.py"
        script.write_text("import sys\n" + body)
        result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                 str(script)], capture_output=True, text=True, timeout=HANG_TIMEOUT,
                                env={**os.environ, "ACCELERATE_USE_CPU": "1"})
        assert result.returncode == 1, result.stderr
        own = script_stderr(result.stderr)
        if expected is not None:
            assert own == expected, result.stderr
        else:
            assert own.startswith("warning: w\nTraceback (most recent call last):\n"), result.stderr
            assert own.endswith("RuntimeError: boom\n") and "accelerate" not in own, result.stderr


@pytest.mark.slow
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


# A wrapper around train.py that counts, per prepared model, the gradient buckets DDP launches an all-reduce for, and
# notes for each launch: which accelerator.backward call it came in (None: outside any), whether autograd was still
# running, how many of the model's gradients backward had yet to compute (still None after zero_grad(set_to_none=True)),
# and whether the bucket's gradients are the bucket itself (gradient_as_bucket_view). It dumps those and the models'
# weights, first and last.
# 4 KiB buckets split the tiny models' gradients (48 KB generator, 1-2 MB discriminators) into several, as DDP's
# default 25 MB buckets split V1's (53 MB generator, 157 MB mpd, 113 MB msd).
DDP_PROBE = """
import dataclasses, os, sys, torch
sys.path.insert(0, {repo!r})
import accelerate, train
from accelerate.utils import DistributedDataParallelKwargs
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

launches, models, initial, backwards = [], {{}}, {{}}, {{"count": 0, "now": None}}

def counting(name, model):
    def hook(state, bucket):
        launches.append({{"model": name, "backward": backwards["now"], "bucket": bucket.index(),
                         "last": bucket.is_last(), "autograd_running": torch._C._current_graph_task_id() != -1,
                         "pending": sum(p.grad is None for p in model.parameters()),
                         "views": all(p.grad is not None and p.grad.data_ptr() == g.data_ptr()
                                      for p, g in zip(bucket.parameters(), bucket.gradients()))}})
        return allreduce_hook(state, bucket)
    return hook

prepare, backward = accelerate.Accelerator.prepare, accelerate.Accelerator.backward

def prepare_counted(self, *objects):
    self.ddp_handler = dataclasses.replace(self.ddp_handler or DistributedDataParallelKwargs(), bucket_cap_mb={cap_mb})
    prepared = prepare(self, *objects)
    for name, model in zip(("generator", "mpd", "msd"), prepared):
        models[name] = model.module
        initial[name] = {{k: p.detach().clone() for k, p in model.module.named_parameters()}}
        model.register_comm_hook(None, counting(name, model.module))
    return prepared

def backward_counted(self, loss, **kwargs):
    backwards["now"] = backwards["count"]
    backward(self, loss, **kwargs)
    backwards["now"], backwards["count"] = None, backwards["count"] + 1

accelerate.Accelerator.prepare, accelerate.Accelerator.backward = prepare_counted, backward_counted
train.main(sys.argv[1:])
torch.save({{"launches": launches, "initial": initial, "final": {{n: m.state_dict() for n, m in models.items()}}}},
           f"rank{{os.environ['RANK']}}.pt")
"""


@pytest.mark.slow
def test_two_process_ddp_overlaps_all_reduce_with_backward(tmp_path, tiny_corpus):
    wrapper = tmp_path / "train_and_count.py"
    wrapper.write_text(DDP_PROBE.format(repo=str(REPO), cap_mb=4096 / 2**20))
    steps = 3
    run_train(tmp_path, tiny_corpus, "--max_steps", str(steps), processes=2, script=wrapper)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    # train_step's backward calls alternate: 2k the discriminators' loss, 2k + 1 the generator's (in no_sync(mpd, msd))
    reduces_in = {"generator": 1, "mpd": 0, "msd": 0}  # the parity of the backward calls each model reduces in
    for rank, dump in enumerate(ranks):
        launches = dump["launches"]
        assert all(launch["backward"] is not None and launch["autograd_running"] for launch in launches), \
            f"rank {rank}: an all-reduce launched outside backward: {launches}"
        assert {launch["backward"] for launch in launches} == set(range(2 * steps)), launches
        for name, parity in reduces_in.items():
            ours = [launch for launch in launches if launch["model"] == name]
            # mpd/msd: nothing in the generator's backward (no_sync); the generator: nothing in the discriminators'
            assert ours and all(launch["backward"] % 2 == parity for launch in ours), f"rank {rank} {name}: {ours}"
            for step in range(steps):
                buckets = [launch for launch in ours if launch["backward"] == 2 * step + parity]
                # each bucket once, in order, every step: one backward's buckets and no more
                assert [launch["bucket"] for launch in buckets] == list(range(len(buckets))), buckets
                assert buckets[-1]["last"] and buckets[-1]["pending"] == 0, buckets
                # gradient_as_bucket_view (train.py): the gradients are the buckets themselves
                assert all(launch["views"] for launch in buckets), buckets
                if step > 0:  # DDP's first step reduces one bucket; it rebuilds them by size after it
                    # Overlap: the first bucket went out while backward still had gradients of this model to compute.
                    assert len(buckets) > 1 and buckets[0]["pending"] > 0, f"rank {rank} {name}: {buckets}"
    assert ranks[0]["launches"] == ranks[1]["launches"]
    for name in reduces_in:
        final = [dump["final"][name] for dump in ranks]
        assert final[0].keys() == final[1].keys()
        for key in final[0]:
            assert torch.equal(final[0][key], final[1][key]), f"{name}.{key} differs between ranks"
        for key, start in ranks[0]["initial"][name].items():
            assert torch.equal(start, ranks[1]["initial"][name][key])
            assert not torch.equal(final[0][key], start), f"{name}.{key} did not train"


@pytest.mark.slow
def test_mixed_precision_for_the_discriminators_only_keeps_the_generator_in_fp32(tmp_path, tiny_corpus):
    # The first step's mel loss is the untrained generator's output: the same as an fp32 run's when only the
    # discriminators run in bf16, another when the generator does too.
    def first_mel_loss(*flags: str) -> tuple[subprocess.CompletedProcess, str]:
        result = run_train(tmp_path, tiny_corpus, "--max_steps", "1", "--mixed_precision", "bf16", *flags,
                           name="discriminators" if flags else "all")
        return result, re.search(r"step 1 epoch 0: .* mel (\S+)", result.stdout + result.stderr).group(1)
    discriminators, mel_discriminators = first_mel_loss("--mixed_precision_networks", "discriminators")
    assert "mixed precision bf16 (discriminators)" in discriminators.stdout
    everything, mel_everything = first_mel_loss()
    assert "mixed precision bf16," in everything.stdout
    fp32 = run_train(tmp_path, tiny_corpus, "--max_steps", "1", name="fp32")
    mel_fp32 = re.search(r"step 1 epoch 0: .* mel (\S+)", fp32.stdout + fp32.stderr).group(1)
    assert mel_discriminators == mel_fp32 != mel_everything


@pytest.mark.slow
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
    # resuming with another architecture: train.py prints one line that names the checkpoint, and no stack trace
    # (what accelerate launch appends after a failed script is the launcher's, not train.py's)
    wrong = run_train(tmp_path, tiny_corpus, "--max_steps", "12", "--resume_from_checkpoint", "latest",
                      "--upsample_initial_channel", "8", name="resumed", check=False)
    own = script_stderr(wrong.stderr)
    assert wrong.returncode == 1 and "Traceback" not in own and "RuntimeError" not in own, wrong.stderr[-3000:]
    errors = [line for line in own.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, wrong.stderr[-3000:]
    message = errors[0]
    assert re.search(r"^error: cannot resume from \S*checkpoint_10: it does not fit", message), message
    assert "size mismatch for" in message and "trained with upsample_initial_channel 16 (now 8)). Resume" in message


@pytest.mark.slow
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
                            timeout=HANG_TIMEOUT)
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
                             env={**environment, **env}, cwd=tmp_path, timeout=HANG_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({run.name.rsplit("-", 1)[1] for run in runs}) == 1, runs


@pytest.mark.slow
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


@pytest.mark.slow
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
    import utils
    assert utils.nested_int_tuple(text)[1][1] in (3, 6)
    with pytest.raises(Exception, match="nested integer"):
        utils.nested_int_tuple("__import__('os').system('true')")


def test_model_flags_are_the_config_fields_and_every_config_is_checked(tmp_path):
    sys.path.insert(0, str(REPO))
    import dataclasses

    from conftest import TINY_CONFIG

    import train
    from model import Generator, HifiGanConfig, load_generator, save_generator
    from utils import UserError
    base = ["--experiment_name", "x", "--working_directory", "w", "--path_to_train_manifest", "a",
            "--path_to_val_manifest", "b"]
    help_text = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True,
                               text=True).stdout
    missing = [field.name for field in dataclasses.fields(HifiGanConfig) if f"--{field.name} " not in help_text]
    assert missing == []
    # the seed's flag forms: lists as separate values, the dilations as a nested tuple, on top of the preset
    config = train.build_config(train.parse_args(base + ["--config", "v3", "--upsample_rates", "8", "8", "2", "2",
                                                         "--upsample_kernel_sizes", "16,16,4,4", "--resblock", "1",
                                                         "--resblock_dilation_sizes", "((1,3,5),(1,3,5),(1,3,5))"]))
    assert config.upsample_rates == (8, 8, 2, 2) and config.upsample_kernel_sizes == (16, 16, 4, 4)
    assert config.upsample_initial_channel == 256 and config.resblock_kernel_sizes == (3, 5, 7)  # from v3
    # a combination that cannot work is refused where it is built, from flags as from a config.json
    with pytest.raises(UserError, match=r"multiply to 128, but .* --hop_size 256"):
        train.build_config(train.parse_args(base + ["--upsample_rates", "8", "8", "2"]))
    with pytest.raises(UserError, match="above the Nyquist frequency"):
        train.build_config(train.parse_args(base + ["--fmax", "12000"]))
    folder = tmp_path / "export"
    save_generator(Generator(TINY_CONFIG), folder)
    config_file = folder / "config.json"
    config_file.write_text(config_file.read_text().replace('"hop_size": 256', '"hop_size": 200'))
    with pytest.raises(UserError, match="--hop_size 200"):
        load_generator(folder)


def write_teacher_forced_mels(folder: Path, manifest: Path) -> None:
    """Stand-in for save_taco_mels.py: the ground-truth mel plus a small offset, frame-aligned per docs/design.md §4."""
    sys.path.insert(0, str(REPO))
    from model import HifiGanConfig
    from utils import load_audio, mel_spectrogram, read_manifest
    folder.mkdir(parents=True, exist_ok=True)
    for row in read_manifest(manifest):
        mel = mel_spectrogram(torch.from_numpy(load_audio(row.audio_path, 22050)), **HifiGanConfig().mel_kwargs())
        np.save(folder / (Path(row.audio_path).stem + ".npy"), (mel + 0.1).numpy())


@pytest.mark.slow
def test_finetune_starts_from_pretrained_weights_and_trains(tmp_path, tiny_corpus):
    sys.path.insert(0, str(REPO))
    from model import MultiPeriodDiscriminator
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
    # each checkpoint says which of accelerate's numbered files holds which model, and loading goes by that name
    contents = json.loads((pretrained / "contents.json").read_text())
    assert {contents[name] for name in ("generator", "mpd", "msd")} == {"model.safetensors", "model_1.safetensors",
                                                                         "model_2.safetensors"}
    assert set(load_file(pretrained / contents["mpd"])) == set(MultiPeriodDiscriminator((2, 3), 8).state_dict())
    for name in ("generator", "mpd", "msd"):  # before the first step: exactly the pretrained weights
        before = load_file(pretrained / contents[name])
        loaded = load_file(tmp_path / "ft0" / "checkpoint_0" / contents[name])
        assert all(torch.equal(before[k], loaded[k]) for k in before)
    run_train(tmp_path, tiny_corpus, *finetune, "--max_steps", "2", name="ft")
    trained = load_file(tmp_path / "ft" / "checkpoint_2" / "model.safetensors")
    start = load_file(pretrained / "model.safetensors")
    assert any(not torch.equal(start[k], trained[k]) for k in start)


@pytest.mark.slow
def test_finetune_continues_the_pretraining_optimisers_only_when_asked(tmp_path, tiny_corpus):
    # 4 steps an epoch: at step 8 the learning rate has decayed once (after epoch 0; epoch 1 ends with the run)
    run_train(tmp_path, tiny_corpus, "--max_steps", "8", "--lr_decay", "0.9", name="pretrain")
    mels = tmp_path / "mels"
    for manifest in tiny_corpus:
        write_teacher_forced_mels(mels, manifest)
    finetune = ["--finetune", "--path_to_saved_mels", str(mels), "--path_to_pretrained_weights",
                str(tmp_path / "pretrain"), "--learning_rate", "5e-5", "--max_steps", "0"]
    continued = run_train(tmp_path, tiny_corpus, *finetune, "--continue_optimizer_state", name="continued")
    assert "optimisers and schedules continued from" in continued.stdout
    assert "learning rate 0.00018 (--learning_rate ignored)" in continued.stdout
    run_train(tmp_path, tiny_corpus, *finetune, name="fresh")
    pretrained = tmp_path / "pretrain" / "checkpoint_8"
    for name in ("optimizer.bin", "optimizer_1.bin"):
        before = torch.load(pretrained / name, weights_only=True)
        after = torch.load(tmp_path / "continued" / "checkpoint_0" / name, weights_only=True)
        fresh = torch.load(tmp_path / "fresh" / "checkpoint_0" / name, weights_only=True)
        assert after["param_groups"][0]["lr"] == before["param_groups"][0]["lr"] == pytest.approx(2e-4 * 0.9)
        assert fresh["param_groups"][0]["lr"] == 5e-5 and not fresh["state"]  # the tutorial's recipe: fresh Adam
        assert len(after["state"]) == len(before["state"]) > 0
        assert all(torch.equal(before["state"][k]["exp_avg"], after["state"][k]["exp_avg"]) for k in before["state"])
    assert torch.load(tmp_path / "continued" / "checkpoint_0" / "scheduler.bin", weights_only=True)["last_epoch"] == 1
    # a generator export alone has no optimiser state to continue
    export_only = tmp_path / "export_only"
    export_only.mkdir()
    for name in ("generator.safetensors", "config.json"):
        (export_only / name).write_bytes((pretrained / name).read_bytes())
    refused = run_train(tmp_path, tiny_corpus, *finetune[:4], str(export_only), "--max_steps", "0",
                        "--continue_optimizer_state", name="refused", check=False)
    assert refused.returncode == 1 and "holds no optimiser state" in refused.stderr


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


def official_layout(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(official name, tensor) of a module's parameters in the order the official code lists them: its state dict's
    order (per conv bias, weight_g, weight_v; test_official_parameter_layout ties it to the official file's)."""
    from model import to_official_names
    parameters = set(to_official_names(dict(module.named_parameters())))
    return [(key, value) for key, value in to_official_names(module.state_dict()).items() if key in parameters]


def test_official_parameter_layout_maps_onto_this_repos_optimisers_shared_fixture():
    """Full-size models, shape by shape: each official state dict's key order and shapes are this repo's (weight_g,
    weight_v <-> original0, original1), and the official optimisers' parameter order (optim_d over msd, then mpd)
    maps by name onto the order main() builds its optimisers in (over mpd, then msd)."""
    import itertools

    from conftest import shared_path

    sys.path.insert(0, str(REPO))
    import train
    from model import MultiPeriodDiscriminator, MultiScaleDiscriminator, build_generator, to_official_names
    official = json.loads(shared_path("fixtures", "official_state_dict_shapes.json").read_text())
    with torch.device("meta"):
        models = {"generator_v1": build_generator("v1"), "generator_v2": build_generator("v2"),
                  "generator_v3": build_generator("v3"), "mpd": MultiPeriodDiscriminator(),
                  "msd": MultiScaleDiscriminator()}
    for name, module in models.items():
        ours = [(key, list(value.shape)) for key, value in to_official_names(module.state_dict()).items()]
        assert ours == list(official[name].items()), name
    for generator in ("generator_v1", "generator_v3"):
        state_dicts = {"generator": {k: torch.empty(shape, device="meta") for k, shape in official[generator].items()},
                       **{name: {k: torch.empty(shape, device="meta") for k, shape in official[name].items()}
                          for name in ("mpd", "msd")}}
        mpd, msd = models["mpd"], models["msd"]
        for name, ours in (("generator", [("generator", models[generator])]),
                           ("discriminator", [("mpd", mpd), ("msd", msd)])):
            expected = [(f"{model_name}.{key}", tuple(p.shape)) for model_name, module in ours
                        for key, p in module.named_parameters()]
            optimizer = torch.optim.AdamW(itertools.chain(*(module.parameters() for _, module in ours)))
            assert [tuple(p.shape) for p in optimizer.param_groups[0]["params"]] == [s for _, s in expected]
            mapped = train.official_parameter_shapes(state_dicts, train.OPTIMIZER_MODELS[name])
            assert [(key, tuple(shape)) for key, shape in mapped.items()] == expected
            listed = train.official_parameter_shapes(state_dicts, train.OFFICIAL_OPTIMIZER_MODELS[name])
            assert sorted(listed) == sorted(mapped) and len(listed) == len(expected)
    # the official optim_d starts with the multi-scale discriminator: its first moment is not this run's first
    assert next(iter(listed)) == "msd.discriminators.0.convs.0.bias"
    assert next(iter(mapped)) == "mpd.discriminators.0.convs.0.bias"
    assert next(iter(listed.values())) != next(iter(mapped.values()))


def test_continue_optimizer_state_from_official_do_file(tmp_path):
    sys.path.insert(0, str(REPO))
    import itertools

    from conftest import TINY_CONFIG

    import train
    from model import Generator, MultiPeriodDiscriminator, MultiScaleDiscriminator, to_official_names

    def models_and_optimizers(config=TINY_CONFIG):  # as train.py's main() builds them
        torch.manual_seed(0)
        generator, mpd, msd = Generator(config), MultiPeriodDiscriminator((2, 3), 8), MultiScaleDiscriminator(8)
        optim_g = torch.optim.AdamW(generator.parameters(), 2e-4, betas=(0.8, 0.99))
        optim_d = torch.optim.AdamW(itertools.chain(mpd.parameters(), msd.parameters()), 2e-4, betas=(0.8, 0.99))
        schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.999) for o in (optim_g, optim_d)]
        return (generator, mpd, msd), (optim_g, optim_d), schedulers

    # An official run after 5 epochs, laid out as the official train.py lays it: optim_g over the generator's
    # parameters, optim_d over itertools.chain(msd.parameters(), mpd.parameters()), each model's parameters in its
    # official order (bias, weight_g, weight_v). One Adam step with a different gradient for every parameter.
    (generator, mpd, msd), _, _ = models_and_optimizers()
    layouts = {"optim_g": [("generator", key, value) for key, value in official_layout(generator)],
               "optim_d": [(model_name, key, value) for model_name, module in (("msd", msd), ("mpd", mpd))
                           for key, value in official_layout(module)]}
    official_moments, optimizer_states = {}, {}
    for optimizer_key, layout in layouts.items():
        params = [torch.nn.Parameter(value.detach().clone()) for _, _, value in layout]
        optimizer = torch.optim.AdamW(params, 2e-4, betas=(0.8, 0.99))
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.999)
        for index, param in enumerate(params):
            param.grad = torch.randn_like(param) + index
        optimizer.step()
        for _ in range(5):
            scheduler.step()
        optimizer_states[optimizer_key] = optimizer.state_dict()
        official_moments.update({(model_name, key): optimizer.state[param]["exp_avg"]
                                 for (model_name, key, _), param in zip(layout, params)})
    torch.save({"generator": to_official_names(generator.state_dict())}, tmp_path / "g_00005000")
    torch.save({"mpd": to_official_names(mpd.state_dict()), "msd": to_official_names(msd.state_dict()),
                **optimizer_states, "steps": 5000, "epoch": 5}, tmp_path / "do_00005000")

    models, fresh, fresh_schedulers = models_and_optimizers()
    message = train.continue_optimizer_state(str(tmp_path / "g_00005000"), fresh, fresh_schedulers)
    assert "learning rate 0.000199" in message
    # every parameter got the moments of the official parameter of the same name
    for optimizer, named in ((fresh[0], [("generator", models[0])]), (fresh[1], [("mpd", models[1]),
                                                                                  ("msd", models[2])])):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.999 ** 5)
        for model_name, module in named:
            for key, param in to_official_names(dict(module.named_parameters())).items():
                assert torch.equal(optimizer.state[param]["exp_avg"], official_moments[model_name, key]), key
    fresh_schedulers[0].step()  # and the schedule goes on from there
    assert fresh_schedulers[0].last_epoch == 6
    assert fresh[0].param_groups[0]["lr"] == pytest.approx(2e-4 * 0.999 ** 6)
    # another model's optimiser state is refused, not loaded into the wrong tensors
    _, other, other_schedulers = models_and_optimizers(TINY_CONFIG.__class__(**{**TINY_CONFIG.to_dict(),
                                                                              "upsample_initial_channel": 8}))
    with pytest.raises(train.UserError, match=r"generator optimiser state in .*do_00005000 belongs to another model"):
        train.continue_optimizer_state(str(tmp_path / "g_00005000"), other, other_schedulers)
    # ... and so is one whose moments do not fit its own weights
    broken = torch.load(tmp_path / "do_00005000", weights_only=True)
    broken["optim_d"]["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(broken, tmp_path / "do_00005000")
    with pytest.raises(train.UserError, match=r"discriminator optimiser state .* \(its moment for msd\."):
        train.continue_optimizer_state(str(tmp_path / "g_00005000"), *models_and_optimizers()[1:])


@pytest.mark.slow
def test_finetune_refuses_missing_mels_at_startup(tmp_path, tiny_corpus):
    (tmp_path / "empty").mkdir()
    command = [sys.executable, str(REPO / "train.py"), "--experiment_name", "x", "--working_directory", str(tmp_path),
               "--path_to_train_manifest", str(tiny_corpus[0]), "--path_to_val_manifest", str(tiny_corpus[1]),
               "--finetune", "--path_to_saved_mels", str(tmp_path / "empty"), "--path_to_pretrained_weights",
               str(tmp_path), *TINY_FLAGS]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and "8 bad rows" in result.stderr and "no train_000.npy in" in result.stderr
    assert "save_taco_mels" in result.stderr


def test_resume_with_another_batch_size_skips_the_clips_already_seen():
    from training import TrainState
    # a checkpoint from before the field existed: 4 batches an epoch, 2 of epoch 1 done
    assert TrainState(step=6, epoch=1).start_epoch_at(steps_per_epoch=4, global_batch_size=2) == 2
    # 2 batches of 2 clips seen; resumed at 4 clips a batch: 1 batch done; at 1 clip a batch: 4
    state = TrainState(step=6, epoch=1, epoch_start_step=4, global_batch_size=2)
    assert state.start_epoch_at(steps_per_epoch=2, global_batch_size=4) == 1
    assert (state.epoch_start_step, state.global_batch_size) == (5, 4)
    assert TrainState(step=6, epoch=1, epoch_start_step=4, global_batch_size=2).start_epoch_at(8, 1) == 4
    # more seen than today's epoch holds: the epoch is over
    assert TrainState(step=12, epoch=1, epoch_start_step=4, global_batch_size=2).start_epoch_at(2, 4) == 2


@pytest.mark.slow
def test_finetune_official_v2_on_real_speech_with_nvidia_conventions_shared_fixture(tmp_path):
    """The recipe's finetuning path on real speech: the authors' V2 generator, LJSpeech clips, mels in NVIDIA
    Tacotron2's conventions (recorded level, centred frames; ground-truth mels stand in for its teacher-forced ones).
    Misread level or frames would cost ~0.2 of log-mel L1 each against the 0.33 that V2 achieves."""
    import csv

    from conftest import shared_path

    sys.path.insert(0, str(REPO))
    from dataset import write_saved_mels_info
    from utils import MelConfig, read_manifest
    generator_v2 = shared_path("fixtures", "generator_v2")
    rows = read_manifest(shared_path("ljspeech_sample", "metadata.csv"))[:3]
    for name, part in (("train", rows[:2]), ("test", rows[2:])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file_path", "normalized_transcript"])
            writer.writerows([row.audio_path, row.transcript] for row in part)
    mels, nvidia = tmp_path / "mels", MelConfig.nvidia()
    mels.mkdir()
    for row in rows:
        audio = torch.from_numpy(nvidia.load(row.audio_path))  # the recorded level
        mel = nvidia.mel(audio)[:, :len(audio) // 256]  # centred frames, the last dropped
        np.save(mels / f"{Path(row.audio_path).stem}.npy", mel.numpy())
    keys = ("sampling_rate", "num_mels", "n_fft", "window_size", "hop_size", "fmin", "fmax", "mel_scale")
    write_saved_mels_info(mels, {"audio_peak": nvidia.audio_peak, "frame_shift": nvidia.frame_shift,
                                 "mel": {key: getattr(nvidia, key) for key in keys}})
    command = [sys.executable, str(REPO / "train.py"), "--experiment_name", "ft", "--working_directory", str(tmp_path),
               "--path_to_train_manifest", str(tmp_path / "train.csv"), "--path_to_val_manifest",
               str(tmp_path / "test.csv"), "--finetune", "--path_to_saved_mels", str(mels),
               "--path_to_pretrained_weights", str(generator_v2), "--config", "v2", "--learning_rate", "0.00005",
               "--batch_size", "1", "--num_workers", "0", "--max_steps", "2", "--validation_steps", "2",
               "--discriminator_width_divisor", "8"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=HANG_TIMEOUT,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generator from" in result.stdout and "looks like v2" not in result.stderr
    error = float(re.search(r"validation mel L1 ([0-9.]+)", result.stdout).group(1))
    assert error < 0.40, result.stdout[-2000:]
