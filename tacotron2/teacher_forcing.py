"""Teacher forcing: Tacotron2's post-net mels for the frames of a recording, as finetuning and evaluation use them.

A Tacotron2 only makes sense of mels made the way its training mels were. Besides the mel parameters, two
conventions differ between Tacotron2s, and `mel_settings` returns them with the rest:

- the level (`audio_peak`): NVIDIA's Tacotron2 was trained on int16 audio / 32768, as recorded (None); this repo's
  tacotron2/train.py peak-normalises each clip, to 0.95 by default, as the vocoder's pretraining does.
- the frames (`center`): NVIDIA's STFT is centred (n_fft / 2 reflect padding, len // hop + 1 frames, frame i
  centred on sample i*hop); this repo's mels are the vocoder's ((n_fft - hop) / 2 padding, len // hop frames,
  frame i centred on sample i*hop + hop / 2).

The teacher-forced mel handed to the vocoder keeps len // hop frames either way. With centred frames, frame i
belongs to the samples [i*hop - hop/2, (i+1)*hop - hop/2): its audio is delayed by `frame_shift(settings)` = hop/2
samples, which save_taco_mels.py records beside the mels and the finetuning dataset applies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from tacotron2.data import collate
from tacotron2.model import Tacotron2, padding_mask
from utils import UserError, db_mel_to_log_mel, load_audio, log_mel_to_db_mel, mel_spectrogram

# NVIDIA's published Tacotron2 (NVIDIA/tacotron2 hparams.py, layers.TacotronSTFT, data_utils.TextMelLoader):
# its file stores none of this, so it is written down here.
NVIDIA_MEL = dict(sampling_rate=22050, num_mels=80, n_fft=1024, window_size=1024, hop_size=256, fmin=0.0,
                  fmax=8000.0, mel_scale="log", min_db=-100.0, max_scaled_abs=4.0, center=True, audio_peak=None)
# What this repo's tacotron2/train.py did before its config.json recorded the two conventions.
REPO_LEGACY_CONVENTIONS = dict(center=False, audio_peak=0.95)
# The mel parameters that must agree between a Tacotron2 and the vocoder reading its mels (the scale is converted).
SHARED_MEL_PARAMETERS = ("sampling_rate", "num_mels", "n_fft", "window_size", "hop_size", "fmin", "fmax")


def stored_audio(weights: str | os.PathLike) -> dict:
    """The mel settings ("audio" in config.json) a checkpoint/export of this repo was trained with; {} for NVIDIA's
    file, which holds none."""
    weights = Path(weights)
    config_file = weights / "config.json" if weights.is_dir() else weights.parent / "config.json"
    if not (weights.is_dir() or weights.suffix == ".safetensors") or not config_file.is_file():
        return {}
    try:
        return dict(json.loads(config_file.read_text()).get("audio") or {})
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as error:
        raise UserError(f"{config_file}: not a readable config.json ({error})") from None


def mel_settings(weights: str | os.PathLike) -> dict:
    """Every mel setting of a Tacotron2's training data, conventions included (see the module docstring)."""
    stored = stored_audio(weights)
    if not stored:
        return dict(NVIDIA_MEL)
    return {**NVIDIA_MEL, **REPO_LEGACY_CONVENTIONS, **stored}


def mel_kwargs(settings: dict) -> dict:
    """The keyword arguments of utils.mel_spectrogram among `settings` (the level is not the mel's business)."""
    return {key: value for key, value in settings.items() if key != "audio_peak"}


def frame_shift(settings: dict) -> int:
    """Samples by which the audio of mel frame i starts before i*hop: hop/2 for centred frames, else 0."""
    return settings["hop_size"] // 2 if settings.get("center") else 0


def convert_scale(mel: torch.Tensor, source: dict, target: dict) -> torch.Tensor:
    """A mel in `source`'s scale (log or db) re-expressed in `target`'s."""
    if source["mel_scale"] == "db":
        mel = db_mel_to_log_mel(mel, source["min_db"], source["max_scaled_abs"])
    if target["mel_scale"] == "db":
        mel = log_mel_to_db_mel(mel, target["min_db"], target["max_scaled_abs"])
    return mel


def load_clip(path: str | os.PathLike, settings: dict) -> np.ndarray:
    """A recording at the Tacotron2's sample rate and level convention."""
    return load_audio(path, settings["sampling_rate"], peak=settings["audio_peak"])


def ground_truth_mel(audio: torch.Tensor, settings: dict) -> torch.Tensor:
    """The mel the Tacotron2 was trained to predict for `audio` (its frames, scale and parameters)."""
    return mel_spectrogram(audio, **mel_kwargs(settings))


@torch.no_grad()
def teacher_forced_mels(model: Tacotron2, tokens: list[torch.Tensor], mels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Post-net mels [n_mel, frames] of a batch of clips, each exactly as long as its ground-truth mel.

    `model` is in eval mode: batch norm uses its running statistics and the encoder, attention, decoder and
    post-net dropouts are off. The prenet's dropout stays on: NVIDIA's Prenet calls `F.dropout(..., training=True)`
    whatever the mode, so the ground-truth-aligned (GTA) scripts built on NVIDIA's model, which call `model.eval()`
    and then the teacher-forced forward, keep it; so does this. The decoder then sees its inputs through
    the same dropout as in training and at inference, so the mels resemble what free-running synthesis produces.
    """
    # Tacotron2.forward, taken apart so that no clip depends on what it is batched with: the encoder's convolutions
    # would read the pad symbol's embedding past a shorter transcript's end, and the post-net's the padding past a
    # shorter clip's last frame. Both are cheap and run per clip; the decoder (the step-by-step loop, the cost) runs
    # batched, its attention masked to each transcript, so every clip comes out as if it had been alone.
    device = model.embedding.weight.device
    memory = pad_sequence([model.encode(t[None].to(device))[0] for t in tokens], batch_first=True)
    text_lengths = torch.tensor([len(t) for t in tokens], device=device)
    _, _, mel_padded, _, output_lengths = collate(list(zip(tokens, mels)))
    mel_decoder, _, _ = model.decoder(memory, mel_padded.to(device), padding_mask(text_lengths, memory.shape[1]))
    outputs = []
    for i, frames in enumerate(output_lengths.tolist()):
        clip = mel_decoder[i:i + 1, :, :frames]
        outputs.append((clip + model.postnet(clip))[0])
    return outputs


def for_vocoder(mel: torch.Tensor, num_samples: int, settings: dict, vocoder_scale: dict) -> torch.Tensor:
    """A teacher-forced mel of a clip of `num_samples` samples as the vocoder reads it: on its scale, and
    len // hop frames (a centred STFT's extra last frame, centred on the clip's last sample, is dropped)."""
    mel = convert_scale(mel.float(), settings, vocoder_scale)
    return mel[:, :num_samples // settings["hop_size"]]
