"""Batches of (symbol ids, mel) pairs, shared by Tacotron2 training and teacher forcing."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """(tokens, mel) pairs -> text_padded [B, T_in], text_lengths [B], mel_padded [B, n_mel, T_out],
    gate_padded [B, T_out], output_lengths [B].

    Text pads with 0 (the pad symbol), mels with 0 and stop targets with 1 (1 from each clip's last frame on): what
    the model outputs past each length (mask_padding), though the losses ignore the padding anyway.
    """
    text_lengths = torch.tensor([len(tokens) for tokens, _ in batch])
    output_lengths = torch.tensor([mel.shape[1] for _, mel in batch])
    text_padded = pad_sequence([tokens for tokens, _ in batch], batch_first=True, padding_value=0)
    mel_padded = torch.zeros(len(batch), batch[0][1].shape[0], int(output_lengths.max()))
    for i, (_, mel) in enumerate(batch):
        mel_padded[i, :, :mel.shape[1]] = mel
    gate_padded = (torch.arange(mel_padded.shape[2])[None, :] >= output_lengths[:, None] - 1).float()
    return text_padded, text_lengths, mel_padded, gate_padded, output_lengths
