"""save_taco_mels.py: teacher-forced mels aligned with their audio, skipping, failures, scales, NVIDIA's layout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import HANG_TIMEOUT, REPO, write_corpus

import save_taco_mels
from tacotron2 import Tacotron2, Tacotron2Config, load_tacotron2, save_tacotron2, text_to_sequence
from utils import UserError, db_mel_to_log_mel, load_audio, mel_spectrogram, read_manifest

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
MEL = dict(sampling_rate=22050, n_fft=1024, num_mels=80, hop_size=256, window_size=1024, fmin=0.0, fmax=8000.0,
           mel_scale="log", min_db=-100.0, max_scaled_abs=4.0)


@pytest.fixture(autouse=True)
def one_thread():
    # Two threads on two busy cores make these tiny ops several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tacotron2(folder: Path, mel_scale: str = "log") -> Path:
    """A random tiny Tacotron2 export, trained (so its config.json says) on `mel_scale` mels. Its prenet dropout is
    0, so that teacher forcing is deterministic and the written mels can be checked exactly."""
    torch.manual_seed(0)
    model = Tacotron2(Tacotron2Config(symbols_embedding_dim=32, encoder_embedding_dim=32, decoder_rnn_dim=64,
                                      attention_rnn_dim=64, prenet_dim=32, attention_dim=16,
                                      attention_location_n_filters=4, attention_location_kernel_size=7,
                                      postnet_embedding_dim=32, prenet_dropout=0.0))
    save_tacotron2(model, folder, extra={"audio": {**MEL, "mel_scale": mel_scale}})
    return folder


def teacher_forced_alone(model: Tacotron2, transcript: str, wav: str, mel_scale: str = "log") -> torch.Tensor:
    """The reference: one clip, unbatched, through the model's own teacher-forced forward."""
    mel = mel_spectrogram(torch.from_numpy(load_audio(wav, 22050)), **{**MEL, "mel_scale": mel_scale})
    tokens = torch.tensor([text_to_sequence(transcript)])
    with torch.no_grad():
        return model(tokens, torch.tensor([tokens.shape[1]]), mel[None], torch.tensor([mel.shape[1]]))[1][0]


def run(*argv: str) -> int:
    return save_taco_mels.main([str(a) for a in argv])


def test_writes_teacher_forced_mels_aligned_with_their_audio_skips_them_on_rerun_or_overwrites(tmp_path, capsys):
    manifest = write_corpus(tmp_path, 5, name="clips")  # 0.6 .. 0.8 s: different lengths in each batch
    weights = tiny_tacotron2(tmp_path / "taco")
    out = tmp_path / "mels"
    assert run("--path_to_manifest", manifest, "--path_to_save", out, "--taco_weights", weights,
               "--batch_size", "2") == 0
    assert "wrote 5, skipped 0, failed 0" in capsys.readouterr().out
    model = load_tacotron2(weights)
    for row in read_manifest(manifest):
        mel = np.load(out / f"{Path(row.audio_path).stem}.npy")
        frames = sf.info(row.audio_path).frames // 256
        assert mel.dtype == np.float32 and mel.shape == (80, frames)
        # Batched and sorted, it is still this clip's own teacher-forced post-net mel, to the last frame.
        reference = teacher_forced_alone(model, row.transcript, row.audio_path)
        assert torch.allclose(torch.from_numpy(mel), reference, atol=1e-4), row.audio_path
        ground_truth = mel_spectrogram(torch.from_numpy(load_audio(row.audio_path, 22050)), **MEL)
        assert not torch.allclose(torch.from_numpy(mel), ground_truth, atol=0.5)  # the model's, not a copy
    # no temporaries; the conventions finetuning needs beside the mels
    assert sorted(p.name for p in out.iterdir()) == [f"clips_{i:03d}.npy" for i in range(5)] + ["taco_mels.json"]

    def files() -> dict[str, tuple[int, int, bytes]]:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.npy")}

    written = files()
    # A file that is not what this model would write: a rerun must leave it alone unless told to --overwrite.
    tampered = out / "clips_004.npy"
    np.save(tampered, np.zeros((80, 3), np.float32))
    before = files()
    assert run("--path_to_manifest", manifest, "--path_to_save", out, "--taco_weights", weights) == 0
    assert "wrote 0, skipped 5, failed 0" in capsys.readouterr().out
    assert files() == before  # same files, times and bytes: nothing was rewritten
    (out / "clips_002.npy").unlink()  # an interrupted run: only the missing clip is redone
    assert run("--path_to_manifest", manifest, "--path_to_save", out, "--taco_weights", weights) == 0
    assert "wrote 1, skipped 4, failed 0" in capsys.readouterr().out
    assert np.load(tampered).shape == (80, 3)

    before = files()
    assert run("--path_to_manifest", manifest, "--path_to_save", out, "--taco_weights", weights, "--overwrite",
               "--batch_size", "2") == 0
    assert "wrote 5, skipped 0, failed 0" in capsys.readouterr().out
    after = files()
    assert sorted(after) == sorted(before)
    # Every file replaced (written afresh and renamed into place), with the model's mels again.
    assert all(after[name][0] != before[name][0] for name in after)
    assert after[tampered.name][2] == written[tampered.name][2]
    assert all(after[name][2] == written[name][2] for name in written if name != "clips_002.npy")


@pytest.mark.slow
def test_failed_rows_are_named_and_counted_while_the_rest_are_written_on_two_processes(tmp_path):
    manifest = write_corpus(tmp_path, 4, seconds=0.3, name="clips")
    lines = manifest.read_text().splitlines()
    lines[2] = "wavs/missing.wav,clip number one"  # line 3: no such wav
    lines[3] = lines[3].split(",")[0] + ",<#%>"  # line 4: nothing left once cleaned
    manifest.write_text("\n".join(lines) + "\n")
    weights = tiny_tacotron2(tmp_path / "taco")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", "1", str(REPO / "save_taco_mels.py"), "--path_to_manifest",
               str(manifest), "--path_to_save", str(tmp_path / "mels"), "--taco_weights", str(weights)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=HANG_TIMEOUT,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "on 2 process(es)" in result.stdout
    failed = re.findall(r"failed: ([^\r\n]*)", result.stderr)  # tqdm's carriage returns may precede them
    assert len(failed) == 2, result.stderr[-2000:]
    assert any("line 3" in line and "missing.wav" in line for line in failed)
    assert any("line 4" in line and "<#%>" in line and "no symbol" in line for line in failed)
    assert result.stdout.count("wrote 2, skipped 0, failed 2") == 1  # counted over both processes, said once
    assert sorted(p.name for p in (tmp_path / "mels").iterdir()) == ["clips_000.npy", "clips_003.npy",
                                                                       "taco_mels.json"]


def test_mels_come_out_in_the_vocoder_scale_whatever_the_tacotron2_was_trained_on(tmp_path, capsys):
    manifest = write_corpus(tmp_path, 2, seconds=0.3, name="clips")
    weights = tiny_tacotron2(tmp_path / "taco_db", mel_scale="db")  # the seed tutorial's Tacotron2 mel
    common = ["--path_to_manifest", manifest, "--taco_weights", weights]
    assert run(*common, "--path_to_save", tmp_path / "as_db", "--mel_scale", "db") == 0
    assert run(*common, "--path_to_save", tmp_path / "as_log") == 0  # default: HiFi-GAN's natural log
    assert "Tacotron2 mel db, written log" in capsys.readouterr().out
    model = load_tacotron2(weights)
    for row in read_manifest(manifest):
        name = f"{Path(row.audio_path).stem}.npy"
        as_db, as_log = (torch.from_numpy(np.load(tmp_path / folder / name)) for folder in ("as_db", "as_log"))
        # The model was fed (and answered in) its own dB scale ...
        assert torch.allclose(as_db, teacher_forced_alone(model, row.transcript, row.audio_path, "db"), atol=1e-4)
        # ... and the log output is the same mel through the repo's converter.
        assert torch.allclose(as_log, db_mel_to_log_mel(as_db), atol=1e-4)
        assert as_log.dtype == torch.float32


def test_clips_that_would_overwrite_each_other_stop_the_run(tmp_path):
    first = write_corpus(tmp_path / "a", 1, seconds=0.3, name="clip")
    second = write_corpus(tmp_path / "b", 1, seconds=0.3, name="clip")  # also wavs/clip_000.wav
    weights = tiny_tacotron2(tmp_path / "taco")
    with pytest.raises(UserError, match=r"would both be saved as clip_000\.npy"):
        run("--path_to_manifest", first, second, "--path_to_save", tmp_path / "mels", "--taco_weights", weights)
    assert run("--path_to_manifest", first, first, "--path_to_save", tmp_path / "mels",
               "--taco_weights", weights) == 0  # the same clip twice is just one clip


def test_nvidia_checkpoint_shared_fixture(tmp_path, capsys):
    weights = FIXTURES / "nvidia_tacotron2_small.pt"
    if not weights.exists():
        pytest.skip(f"{weights} is absent (../shared exists only in the developers' and CI's checkouts)")
    manifest = write_corpus(tmp_path, 2, seconds=0.4, name="clips")
    assert run("--path_to_manifest", manifest, "--path_to_save", tmp_path / "mels", "--taco_weights", weights) == 0
    # NVIDIA's file holds no mel parameters: docs/design.md §1's defaults (hop 256, 80 mels, natural log) apply.
    assert "80 mels, hop 256, Tacotron2 mel log, written log" in capsys.readouterr().out
    for row in read_manifest(manifest):
        mel = np.load(tmp_path / "mels" / f"{Path(row.audio_path).stem}.npy")
        assert mel.dtype == np.float32 and mel.shape == (80, sf.info(row.audio_path).frames // 256)
        assert np.isfinite(mel).all() and mel.std() > 0


def nvidia_layout_tacotron2(path: Path) -> Path:
    """A tiny random Tacotron2 saved as NVIDIA's train.py saves one: a pickle with "state_dict", no config.json."""
    model = load_tacotron2(tiny_tacotron2(path.parent / "export"))
    torch.save({"state_dict": model.state_dict(), "iteration": 0, "learning_rate": 1e-3}, path)
    return path


def test_nvidia_tacotron2_is_fed_its_own_level_and_frames_and_finetuning_gets_matching_audio(tmp_path, monkeypatch):
    from dataset import MelDataset
    from model import HifiGanConfig
    # A quiet recording (peak 0.5). NVIDIA's Tacotron2 was trained on int16 / 32768 audio with no normalisation and
    # a centred STFT: teacher-forcing it with a 0.95-normalised, half-a-hop-late mel feeds it what it never saw.
    manifest = write_corpus(tmp_path, 2, seconds=1.2, name="clips")
    weights = nvidia_layout_tacotron2(tmp_path / "tacotron2_statedict.pt")
    # The model's output is its input here, so the file shows exactly which mel teacher forcing was given.
    monkeypatch.setattr(save_taco_mels, "teacher_forced_mels", lambda model, tokens, mels: mels)
    assert run("--path_to_manifest", manifest, "--path_to_save", tmp_path / "mels", "--taco_weights", weights) == 0
    for index, row in enumerate(read_manifest(manifest)):
        recorded, _ = sf.read(row.audio_path, dtype="float32")
        assert abs(np.abs(recorded).max() - 0.5) < 1e-3
        saved = np.load(tmp_path / "mels" / f"{Path(row.audio_path).stem}.npy")
        nvidia_mel = mel_spectrogram(torch.from_numpy(recorded), **MEL, center=True)  # len // hop + 1 frames
        assert saved.shape == (80, len(recorded) // 256)
        assert np.abs(saved - nvidia_mel[:, :saved.shape[1]].numpy()).max() < 1e-4

        # Finetuning reads the target audio the same way: at the recorded level, and delayed by half a hop, so that
        # the vocoder's own mel of the target audio is the saved mel frame for frame.
        dataset = MelDataset(manifest, HifiGanConfig(), 8192, train=False, saved_mels_dir=tmp_path / "mels")
        mel, audio, _ = dataset[index]
        assert abs(audio.abs().max().item() - 0.5) < 1e-3
        assert torch.equal(audio[128:len(recorded)], torch.from_numpy(recorded)[:len(audio) - 128])
        vocoder_mel = mel_spectrogram(audio, **MEL)
        # (the first and last two frames differ in their padding only)
        assert (vocoder_mel[:, 2:-2] - mel[:, 2:-2]).abs().max() < 1e-3
        # and training crops keep that alignment
        train_set = MelDataset(manifest, HifiGanConfig(), 8192, train=True, saved_mels_dir=tmp_path / "mels")
        mel, audio, _ = train_set[index]
        crop_mel = mel_spectrogram(audio, **MEL)
        assert (crop_mel[:, 2:-2] - mel[:, 2:-2]).abs().max() < 1e-3


def test_own_tacotron2_conventions_are_followed(tmp_path, monkeypatch):
    from dataset import MelDataset
    from model import HifiGanConfig
    manifest = write_corpus(tmp_path, 1, seconds=1.0, name="clips")
    monkeypatch.setattr(save_taco_mels, "teacher_forced_mels", lambda model, tokens, mels: mels)
    recorded, _ = sf.read(read_manifest(manifest)[0].audio_path, dtype="float32")
    # this repo's Tacotron2, trained with --audio_peak none (the level as recorded)...
    weights = tiny_tacotron2(tmp_path / "taco")
    config_file = weights / "config.json"
    config_file.write_text(config_file.read_text().replace('"mel_scale": "log"', '"mel_scale": "log", "center": false, '
                                                           '"audio_peak": null'))
    assert run("--path_to_manifest", manifest, "--path_to_save", tmp_path / "raw", "--taco_weights", weights) == 0
    saved = np.load(tmp_path / "raw" / "clips_000.npy")
    assert np.abs(saved - mel_spectrogram(torch.from_numpy(recorded), **MEL).numpy()).max() < 1e-4
    _, audio, _ = MelDataset(manifest, HifiGanConfig(), 8192, train=False, saved_mels_dir=tmp_path / "raw")[0]
    assert torch.equal(audio, torch.from_numpy(recorded)[:len(audio)])  # as recorded, no shift
    # ... and an older checkpoint that does not say: it was trained on 0.95-normalised audio
    legacy = tiny_tacotron2(tmp_path / "legacy")
    assert run("--path_to_manifest", manifest, "--path_to_save", tmp_path / "legacy_mels", "--taco_weights",
               legacy) == 0
    _, audio, _ = MelDataset(manifest, HifiGanConfig(), 8192, train=False, saved_mels_dir=tmp_path / "legacy_mels")[0]
    assert abs(audio.abs().max().item() - 0.95) < 1e-3
    # mels of both conventions in one folder would need two kinds of audio: refused
    with pytest.raises(UserError, match=r"already holds mels made with other settings .*audio_peak"):
        run("--path_to_manifest", manifest, "--path_to_save", tmp_path / "raw", "--taco_weights", legacy)
