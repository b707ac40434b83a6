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


def test_teacher_forced_mels_missing_or_misaligned_stop_at_startup(tmp_path):
    clip = synth_clip(1.0)
    manifest = manifest_for(tmp_path, {"a": (clip, 22050, "PCM_16"), "b": (clip, 22050, "PCM_16")})
    (tmp_path / "mels").mkdir()
    np.save(tmp_path / "mels" / "a.npy", np.zeros((80, len(clip) // 256), np.float32))
    with pytest.raises(UserError, match=r"1 of 2 clips .* no mel .*b\.npy.*save_taco_mels"):
        MelDataset(manifest, CONFIG, 8192, saved_mels_dir=tmp_path / "mels")
    np.save(tmp_path / "mels" / "b.npy", np.zeros((80, len(clip) // 256 + 5), np.float32))
    with pytest.raises(UserError, match=r"1 mels .* do not match .*b\.npy"):
        MelDataset(manifest, CONFIG, 8192, saved_mels_dir=tmp_path / "mels")


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
