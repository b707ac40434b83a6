"""Teacher forcing: Tacotron2's post-net mels for the frames of a recording, as finetuning and evaluation use them.

A Tacotron2 only makes sense of mels made the way its training mels were: `model.mel` (a utils.MelConfig, stored
with every checkpoint) says how, including two conventions that differ between NVIDIA's Tacotron2 and this repo's:

- the level (`audio_peak`): NVIDIA's was trained on int16 audio / 32768, as recorded (None); train_tacotron2.py
  peak-normalises each clip, to 0.95 by default, as the vocoder's pretraining does.
- the frames (`center`): NVIDIA's STFT is centred (n_fft / 2 reflect padding, len // hop + 1 frames, frame i
  centred on sample i*hop); this repo's mels are the vocoder's ((n_fft - hop) / 2 padding, len // hop frames,
  frame i centred on sample i*hop + hop / 2).

The teacher-forced mel handed to the vocoder keeps len // hop frames either way. With centred frames, frame i
belongs to the samples [i*hop - hop/2, (i+1)*hop - hop/2): the audio is delayed by `MelConfig.frame_shift` samples,
which save_taco_mels.py records beside the mels (dataset.py's taco_mels.json) and the finetuning dataset applies.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from tacotron2.data import collate
from tacotron2.model import Tacotron2, padding_mask
from tacotron2.text import text_to_sequence
from utils import MelConfig, UserError


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


def for_vocoder(mel: torch.Tensor, num_samples: int, taco_mel: MelConfig, vocoder_mel: MelConfig) -> torch.Tensor:
    """A teacher-forced mel of a clip of `num_samples` samples as the vocoder reads it: on its scale, and
    len // hop frames (a centred STFT's extra last frame, centred on the clip's last sample, is dropped)."""
    return taco_mel.convert(mel.float(), vocoder_mel)[:, :num_samples // taco_mel.hop_size]


def teacher_forced_mel(model: Tacotron2, transcript: str, audio: np.ndarray, vocoder_mel: MelConfig) -> torch.Tensor:
    """One clip: `audio` read the model's way (`model.mel.load`) -> its teacher-forced mel for the vocoder."""
    tokens = torch.tensor(text_to_sequence(transcript), dtype=torch.long)
    if not len(tokens):
        raise UserError(f"the transcript {transcript!r} has no symbol Tacotron2 knows once cleaned")
    mel = teacher_forced_mels(model, [tokens], [model.mel.mel(torch.from_numpy(audio))])[0]
    return for_vocoder(mel.cpu(), len(audio), model.mel, vocoder_mel)


def text_to_mel(model: Tacotron2, text: str, vocoder_mel: MelConfig, max_decoder_steps: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Text -> (free-running post-net mel [num_mels, frames] on the vocoder's scale, alignment [frames, tokens])."""
    tokens = text_to_sequence(text)
    if not tokens:
        raise UserError(f"text {text!r} has no symbols Tacotron2 can speak")
    differences = model.mel.differences(vocoder_mel, ("num_mels", "sampling_rate", "hop_size"))
    if differences:
        raise UserError(f"the Tacotron2's mel and the vocoder's differ ({', '.join(differences)}): their mels are "
                        "not interchangeable")
    _, mel, _, alignments = model.infer(tokens, max_decoder_steps=max_decoder_steps)
    return model.mel.convert(mel[0].float().cpu(), vocoder_mel), alignments[0].float().cpu()
