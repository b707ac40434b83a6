"""MelDataset: random segments, padding, whole-utterance validation, teacher-forced mel alignment."""

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import synth_clip

from dataset import MelDataset
from model import HifiGanConfig
from utils import UserError, load_audio, mel_spectrogram

CONFIG = HifiGanConfig()


def manifest_for(folder, clips: dict) -> str:
    """clips: name -> (audio [T] or [T, C], sampling_rate, subtype)."""
    (folder / "wavs").mkdir(parents=True, exist_ok=True)
    lines = ["file_path"]
    for name, (audio, rate, subtype) in clips.items():
        sf.write(folder / "wavs" / f"{name}.wav", audio, rate, subtype=subtype)
        lines.append(f"wavs/{name}.wav")
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    return folder / "m.csv"


def test_segments_short_clips_stereo_44k_and_int16(tmp_path):
    long = synth_clip(1.0, seed=1)
    clips = {"long": (long, 22050, "PCM_16"), "short": (synth_clip(0.1, seed=2), 22050, "FLOAT"),
             "stereo44k": (np.stack([synth_clip(0.8, 44100, 3)] * 2, axis=1), 44100, "PCM_24")}
    dataset = MelDataset(manifest_for(tmp_path, clips), CONFIG, segment_size=8192)
    for index in range(3):
        mel, audio, loss_mel = dataset[index]
        assert audio.shape == (8192,) and mel.shape == loss_mel.shape == (80, 32)
        assert audio.abs().max() <= 0.95 + 1e-6
    # the short clip is padded with zeros, not dropped
    _, audio, _ = dataset[1]
    assert (audio[2205 + 100:] == 0).all() and audio[:2000].abs().max() > 0.5
    # the segment is a window of the whole clip starting at any sample (as the official recipe crops), and its
    # mel is the mel of that window
    whole = torch.from_numpy(load_audio(tmp_path / "wavs" / "long.wav", 22050))
    starts = []
    for epoch in range(8):
        dataset.set_epoch(epoch)
        mel, audio, _ = dataset[0]
        starts += [s for s in range(0, len(whole) - 8192 + 1) if torch.equal(whole[s:s + 8192], audio)]
        assert torch.allclose(mel, mel_spectrogram(audio, **CONFIG.mel_kwargs()))
    assert len(starts) == 8 and any(start % 256 for start in starts)


def test_crops_depend_on_seed_epoch_index_only(tmp_path):
    dataset = MelDataset(manifest_for(tmp_path, {"a": (synth_clip(2.0), 22050, "PCM_16")}), CONFIG, 8192, seed=3)
    first = dataset[0][1]
    assert torch.equal(first, dataset[0][1])  # same epoch: same crop, whatever the global RNG did
    crops = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        crops.add(dataset[0][1][:64].sum().item())
    assert len(crops) > 1  # the window moves across epochs


def test_validation_items_are_whole_utterances(tmp_path):
    clip = synth_clip(1.3)
    dataset = MelDataset(manifest_for(tmp_path, {"a": (clip, 22050, "PCM_16")}), CONFIG, 8192, train=False)
    mel, audio, loss_mel = dataset[0]
    assert len(audio) == len(clip) // 256 * 256 and mel.shape == (80, len(clip) // 256)
    assert loss_mel.shape == mel.shape and not torch.allclose(loss_mel, mel)  # fmax_loss=None vs fmax 8000


def test_teacher_forced_mels_are_cropped_in_alignment(tmp_path):
    clip = synth_clip(1.5)
    manifest = manifest_for(tmp_path, {"a": (clip, 22050, "PCM_16")})
    frames = len(clip) // 256
    saved = np.arange(80 * frames, dtype=np.float32).reshape(80, frames) / 1000.0  # frame index readable
    (tmp_path / "mels").mkdir()
    np.save(tmp_path / "mels" / "a.npy", saved)
    dataset = MelDataset(manifest, CONFIG, 8192, saved_mels_dir=tmp_path / "mels")
    mel, audio, loss_mel = dataset[0]
    assert mel.shape == (80, 32) and audio.shape == (8192,)
    start_frame = round(mel[0, 0].item() * 1000)
    whole = torch.from_numpy(load_audio(tmp_path / "wavs" / "a.wav", 22050))
    assert torch.equal(audio, whole[start_frame * 256:(start_frame + 32) * 256])
    assert torch.allclose(loss_mel, mel_spectrogram(audio, **CONFIG.mel_kwargs(for_loss=True)))


def test_every_bad_teacher_forced_mel_is_listed_in_one_report_at_startup(tmp_path):
    clip = synth_clip(1.0)
    frames = len(clip) // 256
    names = ("good", "missing", "bands", "frames", "nan", "no_audio")
    manifest = manifest_for(tmp_path, {name: (clip, 22050, "PCM_16") for name in names})
    (tmp_path / "wavs" / "no_audio.wav").unlink()
    (tmp_path / "mels").mkdir()
    np.save(tmp_path / "mels" / "good.npy", np.zeros((80, frames), np.float32))
    np.save(tmp_path / "mels" / "bands.npy", np.zeros((100, frames), np.float32))
    np.save(tmp_path / "mels" / "frames.npy", np.zeros((80, frames + 5), np.float32))
    np.save(tmp_path / "mels" / "nan.npy", np.full((80, frames), np.nan, np.float32))
    # one report, every kind of problem, each row named with its line, file and fix (the audio's problem too)
    with pytest.raises(UserError) as error:
        MelDataset(manifest, CONFIG, 8192, saved_mels_dir=tmp_path / "mels")
    lines = str(error.value).splitlines()
    assert lines[0] == f"5 bad rows in {manifest} (fix them, or pass --skip_bad_files to drop them):"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [f"line {n}" for n in (3, 4, 5, 6, 7)]
    assert "missing.wav: no missing.npy in" in lines[1] and "run save_taco_mels.py on this manifest" in lines[1]
    assert f"bands.npy is (100, {frames}), not [80 mels, {frames}±1 frames]" in lines[2]
    assert f"frames.npy is (80, {frames + 5})" in lines[3] and "nan.npy has" in lines[4] and "NaN/inf" in lines[4]
    assert "no_audio.wav: file does not exist" in lines[5]
    with pytest.warns(UserWarning, match="dropped 5 bad rows") as record:
        dataset = MelDataset(manifest, CONFIG, 8192, saved_mels_dir=tmp_path / "mels", skip_bad_files=True)
    assert [row.audio_path for row in dataset.rows] == [str(tmp_path / "wavs" / "good.wav")]
    assert str(record[0].message).count("\n  line ") == 5


def test_more_bad_rows_than_a_screenful_go_to_a_file_in_the_run_folder(tmp_path):
    clip = synth_clip(0.05)
    manifest = manifest_for(tmp_path, {f"c{i:02d}": (clip, 22050, "PCM_16") for i in range(30)})
    (tmp_path / "mels").mkdir()
    np.save(tmp_path / "mels" / "c00.npy", np.zeros((80, len(clip) // 256), np.float32))
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as error:
        MelDataset(manifest, CONFIG, 8192, saved_mels_dir=tmp_path / "mels", report_dir=run_dir)
    lines = str(error.value).splitlines()
    report = run_dir / "bad_rows_m.txt"
    assert lines[0].startswith(f"29 bad rows in {manifest}") and len(lines) == 1 + 20 + 1
    assert lines[-1].strip() == f"... and 9 more: all 29 in {report}"
    listed = report.read_text().splitlines()
    assert listed[0] == lines[0] and listed[1:21] == [line.strip() for line in lines[1:21]]
    assert len(listed) == 30 and listed[-1].startswith("line 31: ") and "c29.wav: no c29.npy" in listed[-1]
    with pytest.warns(UserWarning, match=r"(?s)dropped 29 bad rows .*\.\.\. and 9 more: all 29 in "):
        dataset = MelDataset(manifest, CONFIG, 8192, saved_mels_dir=tmp_path / "mels", skip_bad_files=True,
                             report_dir=run_dir)
    assert len(dataset) == 1 and report.read_text().startswith("--skip_bad_files: dropped 29 bad rows")


def test_non_finite_saved_mels_are_bad_rows_at_startup(tmp_path):
    clip = synth_clip(1.0)
    manifest = manifest_for(tmp_path, {"a": (clip, 22050, "PCM_16"), "b": (clip, 22050, "PCM_16")})
    (tmp_path / "mels").mkdir()
    np.save(tmp_path / "mels" / "a.npy", np.zeros((80, len(clip) // 256), np.float32))
    broken = np.zeros((80, len(clip) // 256), np.float32)
    broken[3, 7], broken[5, 9] = np.nan, np.inf
    np.save(tmp_path / "mels" / "b.npy", broken)
    # listed before the first step (not found hours later as skipped steps), with the row, the file and the fix
    with pytest.raises(UserError, match=r"(?s)1 bad rows in .*line 3: .*b\.wav: b\.npy has 2 NaN/inf values; re-run "
                                        r"save_taco_mels\.py --overwrite"):
        MelDataset(manifest, CONFIG, 8192, saved_mels_dir=tmp_path / "mels")
    with pytest.warns(UserWarning, match="dropped 1 bad rows"):
        dataset = MelDataset(manifest, CONFIG, 8192, saved_mels_dir=tmp_path / "mels", skip_bad_files=True)
    assert [row.audio_path.endswith("a.wav") for row in dataset.rows] == [True]
