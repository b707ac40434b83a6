"""train_tacotron2.py: data and losses, overfitting two utterances, a real accelerate launch, resume, start weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import HANG_TIMEOUT, REPO, write_corpus
from safetensors.torch import load_file

from tacotron2 import load_tacotron2
from tacotron2.data import TextMelDataset, collate, tacotron2_loss
from train_tacotron2 import build_config, init_weights, mel_config, parse_args
from utils import UserError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"

# A Tacotron2 small enough that a training step on two short clips takes a few tens of milliseconds.
TINY_FLAGS = ["--character_embed_dim", "32", "--encoder_embed_dim", "32", "--decoder_rnn_embed_dim", "64",
              "--decoder_prenet_dim", "32", "--decoder_postnet_n_filters", "32", "--attention_dim", "16",
              "--attention_location_n_filters", "4", "--attention_location_kernel_size", "7"]


def flags(train: Path, val: Path, *extra: str) -> list[str]:
    return ["--experiment_name", "x", "--working_directory", "unused", "--path_to_train_manifest", str(train),
            "--path_to_val_manifest", str(val), *TINY_FLAGS, *extra]


@pytest.fixture
def one_thread():
    # Two threads on two busy cores make these tiny ops slower, and one thread makes the runs repeatable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Flags, data, losses
# ---------------------------------------------------------------------------------------------

def test_tutorial_flags_map_onto_nvidia_config_fields():
    args = parse_args(flags(Path("a"), Path("b"), "--decoder_dropout_p", "0.2", "--attention_dropout_p", "0.3",
                            "--encoder_dropout_p", "0.4", "--decoder_prenet_dropout_p", "0.45",
                            "--decoder_postnet_dropout_p", "0.35", "--decoder_postnet_num_convs", "4",
                            "--decoder_postnet_kernel_size", "3", "--encoder_n_convolutions", "2",
                            "--encoder_kernel_size", "3", "--num_mels", "40"))
    config = build_config(args)
    assert (config.symbols_embedding_dim, config.encoder_embedding_dim, config.prenet_dim) == (32, 32, 32)
    assert config.decoder_rnn_dim == config.attention_rnn_dim == 64
    assert (config.postnet_embedding_dim, config.postnet_n_convolutions, config.postnet_kernel_size) == (32, 4, 3)
    assert (config.encoder_n_convolutions, config.encoder_kernel_size, config.n_mel_channels) == (2, 3, 40)
    assert (config.attention_dim, config.attention_location_n_filters, config.attention_location_kernel_size) == \
        (16, 4, 7)
    assert (config.p_decoder_dropout, config.p_attention_dropout, config.encoder_dropout, config.prenet_dropout,
            config.postnet_dropout) == (0.2, 0.3, 0.4, 0.45, 0.35)
    assert config.n_symbols == 148  # NVIDIA's symbol table, so that their checkpoint's embedding fits
    with pytest.raises(UserError, match="--decoder_prenet_depth 3 is not supported"):
        build_config(parse_args(flags(Path("a"), Path("b"), "--decoder_prenet_depth", "3")))


def test_collate_pads_text_and_mels_and_marks_stop_from_the_last_frame():
    batch = [(torch.tensor([5, 6, 7]), torch.randn(4, 5)), (torch.tensor([8, 9]), torch.randn(4, 3))]
    text, text_lengths, mel, gate, output_lengths = collate(batch)
    assert text.tolist() == [[5, 6, 7], [8, 9, 0]] and text_lengths.tolist() == [3, 2]
    assert output_lengths.tolist() == [5, 3] and mel.shape == (2, 4, 5)
    assert torch.equal(mel[0], batch[0][1]) and torch.equal(mel[1, :, :3], batch[1][1])
    assert mel[1, :, 3:].abs().sum() == 0
    assert gate.tolist() == [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1]]


def test_losses_average_over_real_frames_only():
    torch.manual_seed(0)
    clips = [(torch.tensor([5, 6]), torch.randn(4, 6)), (torch.tensor([7]), torch.randn(4, 2))]
    _, _, mel, gate, lengths = collate(clips)
    prediction, prediction_postnet, gate_logits = torch.randn_like(mel), torch.randn_like(mel), torch.randn_like(gate)
    losses = tacotron2_loss(prediction, prediction_postnet, gate_logits, mel, gate, lengths)
    # Each clip alone, weighted by its frames, gives the same numbers: padding neither counts nor dilutes.
    alone = [tacotron2_loss(prediction[i:i + 1, :, :n], prediction_postnet[i:i + 1, :, :n], gate_logits[i:i + 1, :n],
                            mel[i:i + 1, :, :n], gate[i:i + 1, :n], lengths[i:i + 1]) for i, n in enumerate([6, 2])]
    for k in range(4):
        assert torch.allclose(losses[k], (alone[0][k] * 6 + alone[1][k] * 2) / 8, atol=1e-6)
    # Garbage past the short clip's end changes nothing.
    prediction[1, :, 2:] = 100.0
    gate_logits[1, 2:] = -50.0
    assert torch.allclose(tacotron2_loss(prediction, prediction_postnet, gate_logits, mel, gate, lengths)[0], losses[0])


def test_dataset_targets_are_the_repo_mel_of_each_wav(tmp_path):
    manifest = write_corpus(tmp_path, 2, seconds=0.3, name="two")
    args = parse_args(flags(manifest, manifest))
    dataset = TextMelDataset(manifest, mel_config(args))
    tokens, mel = dataset[1]
    assert tokens.dtype == torch.long and len(tokens) == len("clip number one")  # numbers are spelled out
    samples = sf.info(str(tmp_path / "wavs" / "two_001.wav")).frames
    assert mel.shape == (80, samples // 256)
    # natural-log mel by default, the dB scale on request, and the two agree through the repo's converter
    from utils import db_mel_to_log_mel
    db = TextMelDataset(manifest, mel_config(parse_args(flags(manifest, manifest, "--mel_scale", "db"))))[1][1]
    # floored at -4 (min_db) but not clipped at the top: 0.95-peak speech goes above 0 dB (+4 on this scale)
    assert db.min() >= -4.0 and db.max() > 4.0 and mel.min() < -4.0
    inside = db > -3.99
    assert torch.allclose(db_mel_to_log_mel(db)[inside], mel[inside], atol=1e-3)


def corpus_with_bad_rows(folder: Path, *bad: str, good: int = 3) -> Path:
    """`good` clips, then rows appended for: "corrupt" (a wav with a broken header), "missing" (no such file),
    "short" (100 samples, under one hop), "untranscribed" (a good wav with an empty transcript), "unspeakable"
    (a transcript with nothing left once cleaned)."""
    manifest = write_corpus(folder, good, seconds=0.3, name="clips")
    (folder / "wavs" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    sf.write(folder / "wavs" / "short.wav", torch.zeros(100).numpy(), 22050)
    rows = {"corrupt": "wavs/corrupt.wav,a broken file", "missing": "wavs/missing.wav,not there",
            "short": "wavs/short.wav,too short", "untranscribed": "wavs/clips_000.wav,",
            "unspeakable": "wavs/clips_001.wav,<#%>"}
    with open(manifest, "a") as handle:
        handle.writelines(rows[name] + "\n" for name in bad)
    return manifest


@pytest.mark.slow
def test_a_bad_row_stops_the_script_at_startup_with_one_line(tmp_path):
    manifest = corpus_with_bad_rows(tmp_path, "corrupt")  # line 5
    command = [sys.executable, str(REPO / "train_tacotron2.py"), *flags(manifest, manifest)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=HANG_TIMEOUT)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: {manifest}, line 5: ") and "corrupt.wav: unreadable" in result.stderr
    assert "--skip_bad_files" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "unused").exists()


def test_all_bad_rows_are_reported_together_or_dropped_and_counted(tmp_path):
    audio = mel_config(parse_args(flags(Path("a"), Path("b"))))
    kinds = ("corrupt", "missing", "short", "untranscribed", "unspeakable")
    manifest = corpus_with_bad_rows(tmp_path, *kinds)  # lines 5 to 9
    with pytest.raises(UserError) as excinfo:
        TextMelDataset(manifest, audio)
    message = str(excinfo.value)
    assert message.startswith(f"5 bad rows in {manifest}") and "--skip_bad_files" in message.splitlines()[0]
    for line, reason in zip(range(5, 10), ("corrupt.wav: unreadable", "missing.wav: file does not exist",
                                           "short.wav: 0.0045 s long, shorter than 0.0116 s", "line 8: no transcript",
                                           "the transcript '<#%>' has no symbol")):
        assert f"line {line}: " in message and reason in message
    with pytest.warns(UserWarning, match=r"--skip_bad_files: dropped 5 bad rows of .*, kept 3") as record:
        dataset = TextMelDataset(manifest, audio, skip_bad_files=True)
    assert "corrupt.wav: unreadable" in str(record[0].message)
    assert len(dataset) == 3 and [row.line for row in dataset.rows] == [2, 3, 4]
    assert [len(tokens) for tokens, _ in dataset] == [len("clip number zero"), len("clip number one"),
                                                      len("clip number two")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quiet: another process of the run says it
        assert len(TextMelDataset(manifest, audio, skip_bad_files=True, quiet=True)) == 3
    only_bad = tmp_path / "only_bad.csv"
    only_bad.write_text("file_path,normalized_transcript\nwavs/missing.wav,not there\n")
    with pytest.raises(UserError, match="no usable rows left"), pytest.warns(UserWarning):
        TextMelDataset(only_bad, audio, skip_bad_files=True)


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_tacotron2_overfits_two_utterances_and_then_stops_by_itself(tmp_path, one_thread):
    torch.manual_seed(0)
    manifest = write_corpus(tmp_path, 2, seconds=0.3, name="two")
    # Hop 512: 12 and 15 frames for the two clips, so that a step is cheap (and a non-default mel is exercised).
    args = parse_args(flags(manifest, manifest, "--hop_size", "512", "--n_fft", "2048", "--window_size", "2048"))
    from tacotron2 import Tacotron2
    model = Tacotron2(build_config(args))
    text, text_lengths, mel, gate, output_lengths = collate(list(TextMelDataset(manifest, mel_config(args))))
    assert output_lengths.tolist() == [12, 15]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, eps=args.adam_eps, weight_decay=args.weight_decay)
    # The best prediction that ignores time: each mel channel's mean over the clip.
    variance_over_time = (mel - mel.mean(dim=2, keepdim=True)).pow(2).mean().item()

    losses, stopped_at, lengths = [], None, None
    for step in range(1, 601):  # stops near the true ends after 200-250 steps (seeds 0-3)
        model.train()
        mel_out, mel_postnet, gate_out, _ = model(text, text_lengths, mel, output_lengths)
        loss, _, loss_postnet, _ = tacotron2_loss(mel_out, mel_postnet, gate_out, mel, gate, output_lengths)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if stopped_at is None and step >= 100 and step % 25 == 0:
            model.eval()
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # reaching max_decoder_steps raises: not stopped
                try:
                    lengths = [model.infer(text[i, :text_lengths[i]], max_decoder_steps=4 * int(output_lengths[i]))
                               [1].shape[2] for i in range(2)]
                except RuntimeWarning:
                    continue
            # The stop token fired near each clip's true end, not at some arbitrary frame.
            if all(0.75 * n <= length <= 1.25 * n for length, n in zip(lengths, output_lengths.tolist())):
                stopped_at = step
        if stopped_at is not None and step >= 300:
            break
    assert losses[99] < 0.5 * losses[0], f"loss {losses[0]:.3f} -> {losses[99]:.3f} after 100 steps"
    assert loss_postnet.item() < 0.25 * variance_over_time, "the post-net mel has not learnt the time structure"
    assert stopped_at is not None, f"infer never stopped near the true lengths {output_lengths.tolist()}: {lengths}"


# ---------------------------------------------------------------------------------------------
# The script: accelerate launch, checkpoints, validation media, resume
# ---------------------------------------------------------------------------------------------

def run_script(tmp_path: Path, corpus: tuple[Path, Path], *extra: str, name: str, launcher: str,
               wandb_offline: bool = False) -> str:
    train_manifest, val_manifest = corpus
    script = [str(REPO / "train_tacotron2.py"), "--experiment_name", name, "--working_directory", str(tmp_path),
              "--path_to_train_manifest", str(train_manifest), "--path_to_val_manifest", str(val_manifest),
              "--batch_size", "2", "--num_workers", "0", "--console_out_iters", "1", "--max_decoder_steps", "40",
              *TINY_FLAGS, *extra]
    if launcher == "accelerate":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", *script]
    else:
        command = [sys.executable, *script]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    environment.update({"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    # No credentials and WANDB_MODE unset: the script must choose offline by itself.
    environment.update({"HOME": str(tmp_path)} if wandb_offline else {"WANDB_MODE": "disabled"})
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path,
                            timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_accelerate_launch_writes_checkpoints_and_a_resumed_run_continues_exactly(tmp_path, tiny_corpus):
    # 8 clips at batch 2: 4 steps an epoch. Checkpoints at 3 (mid-epoch) and 6; validation media at step 3.
    output = run_script(tmp_path, tiny_corpus, "--max_steps", "6", "--checkpoint_steps", "3",
                        "--validation_steps", "3", "--save_audio_gen", str(tmp_path / "generated"),
                        "--log_wandb", "--wandb_log_iters", "2", name="straight", launcher="accelerate",
                        wandb_offline=True)
    assert "step 3: validation loss" in output and "wandb is offline" in output
    run = tmp_path / "straight"
    for step in (3, 6):
        assert (run / f"checkpoint_{step}" / "checkpoint_complete").exists()
    # Each checkpoint is an inference folder too, with the mel it was trained on.
    model = load_tacotron2(run / "checkpoint_6")
    assert model.config.decoder_rnn_dim == 64 and not model.training
    audio = json.loads((run / "checkpoint_6" / "config.json").read_text())["audio"]
    assert audio == {**audio, "mel_scale": "log", "hop_size": 256, "num_mels": 80, "fmax": 8000.0}
    trained = load_file(run / "checkpoint_6" / "model.safetensors")
    exported = load_file(run / "tacotron2.safetensors")
    assert all(torch.equal(trained[k], exported[k]) for k in exported)
    assert not torch.equal(trained["embedding.weight"],
                           load_file(run / "checkpoint_3" / "model.safetensors")["embedding.weight"])
    # Validation plots and Griffin-Lim audio of the first validation clip (whose mel has len // hop frames).
    generated = tmp_path / "generated"
    assert (generated / "step_3_mels.png").stat().st_size > 0 and (generated / "step_3_alignment.png").exists()
    wav, rate = sf.read(generated / "step_3_teacher_forced_griffin_lim.wav")
    first_val = sf.info(str(tiny_corpus[1].parent / "wavs" / "test_000.wav")).frames
    assert rate == 22050 and len(wav) == first_val // 256 * 256 and abs(wav).max() > 0.01
    assert (generated / "step_3_inferred_griffin_lim.wav").exists()
    # ... logged to wandb (offline) too, beside the scalars.
    offline_run = next((run / "wandb").glob("offline-run-*"))
    records = next(offline_run.glob("run-*.wandb")).read_bytes()
    assert records.count(b"train/loss_gate") >= 3 and b"val/loss_mel_postnet" in records
    media = [p.relative_to(offline_run / "files" / "media").as_posix() for p in
             (offline_run / "files" / "media").rglob("*.*")]
    for prefix in ("images/val/mels_3", "images/val/alignment_3", "audio/val/audio_teacher_forced_3",
                   "audio/val/audio_inferred_3"):
        assert any(path.startswith(prefix) for path in media), (prefix, media)

    # Resume from the mid-epoch checkpoint as a plain script, with 'latest', in a run of its own.
    shutil.copytree(run / "checkpoint_3", tmp_path / "resumed" / "checkpoint_3")
    output = run_script(tmp_path, tiny_corpus, "--max_steps", "6", "--resume_from_checkpoint", "latest",
                        name="resumed", launcher="python")
    assert "at step 3, epoch 0" in output
    assert "step 4 epoch 0" in output and "step 5 epoch 1" in output and "step 1 epoch" not in output
    resumed = load_file(tmp_path / "resumed" / "checkpoint_6" / "model.safetensors")
    for key, value in trained.items():
        assert torch.allclose(value, resumed[key], atol=1e-6), f"{key}: the resumed run diverged"


@pytest.mark.slow
def test_two_processes_skip_bad_files_train_and_print_each_line_once(tmp_path):
    manifest = corpus_with_bad_rows(tmp_path, "corrupt", good=4)  # 4 clips: one batch of 2 on each process
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", "1", str(REPO / "train_tacotron2.py"), "--experiment_name", "run",
               "--working_directory", str(tmp_path), "--path_to_train_manifest", str(manifest),
               "--path_to_val_manifest", str(manifest), "--batch_size", "2", "--num_workers", "0",
               "--console_out_iters", "1", "--max_steps", "2", "--max_decoder_steps", "20", "--skip_bad_files",
               *TINY_FLAGS]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path,
                            timeout=HANG_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Tacotron2 on 2 process(es)" in output
    # The bad row is dropped (train and validation manifests alike), said by one process only.
    assert output.count("--skip_bad_files: dropped 1 bad rows") == 2 and "kept 4" in output
    # One console line per step, not one per process (tqdm.write ignores the bar's disable=).
    for step in (1, 2):
        assert output.count(f"step {step} epoch {step - 1}: loss ") == 1, output[-3000:]
    assert (tmp_path / "run" / "checkpoint_2" / "checkpoint_complete").exists()


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path, tiny_corpus):
    assert parse_args(flags(Path("a"), Path("b"))).max_nonfinite_steps == 20
    # The loss is NaN from the second step on: steps 2-4 leave the weights alone, and the third in a row stops the
    # run with the state saved. The fault is injected from outside the code under test.
    script = tmp_path / "poisoned_train.py"
    # (The training step, tacotron2.data.train_step, looks the loss up in its own module: patched there.)
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport train_tacotron2 as train\n"
                      "import tacotron2.data\n"
                      "from utils import run_cli\noriginal, calls = tacotron2.data.tacotron2_loss, [0]\n"
                      "def poisoned(*args):\n    calls[0] += 1\n    losses = original(*args)\n"
                      "    return (losses[0] * float('nan'), *losses[1:]) if calls[0] >= 2 else losses\n"
                      "tacotron2.data.tacotron2_loss = poisoned\nrun_cli(lambda: train.main(sys.argv[1:]))\n")
    command = [sys.executable, str(script), "--experiment_name", "nan", "--working_directory", str(tmp_path),
               "--path_to_train_manifest", str(tiny_corpus[0]), "--path_to_val_manifest", str(tiny_corpus[1]),
               "--batch_size", "2", "--num_workers", "0", "--max_steps", "20", "--checkpoint_steps", "1",
               "--keep_last_checkpoints", "10", "--max_nonfinite_steps", "3", *TINY_FLAGS]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=HANG_TIMEOUT,
                            env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    for step in (2, 3, 4):
        assert f"step {step}: non-finite loss or gradient, optimiser step skipped ({step - 1} in a row)" \
            in result.stdout
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: 3 steps in a row had a non-finite loss or gradient (the last at step 4); saved "
                            f"the last good state in {tmp_path / 'nan' / 'checkpoint_4'}. Try a lower --learning_rate")
    run = tmp_path / "nan"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == [f"checkpoint_{step}" for step in (1, 2, 3, 4)]
    after_1, after_4 = (load_file(run / f"checkpoint_{step}" / "model.safetensors") for step in (1, 4))
    assert all(torch.equal(after_1[k], after_4[k]) for k in after_1)  # the skipped steps touched nothing
    assert all(torch.isfinite(v).all() for v in after_4.values())


# ---------------------------------------------------------------------------------------------
# Start weights
# ---------------------------------------------------------------------------------------------

def test_init_from_nvidia_checkpoint_shared_fixture():
    path = FIXTURES / "nvidia_tacotron2_small.pt"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared exists only in the developers' and CI's checkouts)")
    small = json.loads((FIXTURES / "nvidia_tacotron2.json").read_text())["small_config"]
    assert small["decoder_rnn_dim"] == small["attention_rnn_dim"]  # what the one tutorial flag can express
    args = parse_args(["--experiment_name", "x", "--working_directory", "w", "--path_to_train_manifest", "a",
                       "--path_to_val_manifest", "b", "--character_embed_dim", str(small["symbols_embedding_dim"]),
                       "--encoder_embed_dim", str(small["encoder_embedding_dim"]),
                       "--decoder_rnn_embed_dim", str(small["decoder_rnn_dim"]),
                       "--decoder_prenet_dim", str(small["prenet_dim"]), "--attention_dim", str(small["attention_dim"]),
                       "--attention_location_n_filters", str(small["attention_location_n_filters"]),
                       "--decoder_postnet_n_filters", str(small["postnet_embedding_dim"])])
    from tacotron2 import Tacotron2
    model = Tacotron2(build_config(args))
    init_weights(model, path)
    reference = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    wrong = Tacotron2(build_config(parse_args(flags(Path("a"), Path("b")))))
    with pytest.raises(UserError, match=r"--init_from: .*must describe the architecture"):
        init_weights(wrong, path)
