"""Tacotron2's data: (symbol ids, mel) pairs from a manifest, their batches, the training loss and step.

Shared by train_tacotron2.py and teacher forcing (tacotron2/teacher_forcing.py).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from tacotron2.model import padding_mask
from tacotron2.text import text_to_sequence
from utils import MelConfig, UserError, check_audio_files, read_manifest


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


class TextMelDataset(Dataset):
    """Items are (tokens [T_in] long, mel [num_mels, len(audio) // hop_size]) for each row of a manifest.

    Every row is checked at start-up, not hours into training: its audio (exists, readable, not empty, at least one
    hop long: utils.check_audio_files, as the vocoder's MelDataset) and its transcript (present, with at least one
    symbol once cleaned). All bad rows are reported in one UserError naming the manifest; with `skip_bad_files` they
    are dropped instead and counted in a warning (`quiet` leaves that to another process of the run).
    """

    def __init__(self, manifest: str | os.PathLike, mel: MelConfig, skip_bad_files: bool = False,
                 quiet: bool = False) -> None:
        rows = read_manifest(manifest, check_files=False)
        self.mel = mel
        reasons: dict[int, list[str]] = {}
        for row, reason in check_audio_files(rows, min_seconds=mel.hop_size / mel.sampling_rate):
            reasons.setdefault(id(row), []).append(f"{row.audio_path}: {reason}")
        self.rows, self.tokens = [], []
        for row in rows:
            tokens = text_to_sequence(row.transcript) if (row.transcript or "").strip() else None
            if tokens is None:
                reasons.setdefault(id(row), []).append(
                    f"no transcript for {row.audio_path} (Tacotron2 needs a 'normalized_transcript' column, "
                    "which prep_splits.py writes)")
            elif not tokens:
                reasons.setdefault(id(row), []).append(
                    f"the transcript {row.transcript!r} has no symbol Tacotron2 knows once cleaned")
            if id(row) not in reasons:
                self.rows.append(row)
                self.tokens.append(torch.tensor(tokens, dtype=torch.long))
        bad = [f"line {row.line}: {'; '.join(reasons[id(row)])}" for row in rows if id(row) in reasons]
        if bad and not skip_bad_files:
            if len(bad) == 1:
                raise UserError(f"{manifest}, {bad[0]}; fix the row, or pass --skip_bad_files to drop it")
            raise UserError(f"{len(bad)} bad rows in {manifest} (fix them, or pass --skip_bad_files to drop them):"
                            "\n  " + "\n  ".join(bad))
        if bad and not quiet:
            warnings.warn(f"--skip_bad_files: dropped {len(bad)} bad rows of {manifest}, kept {len(self.rows)}:\n  "
                          + "\n  ".join(bad), stacklevel=2)
        if not self.rows:
            raise UserError(f"no usable rows left in {manifest}")
        # Build the mel filter bank in the main process: DataLoader workers forked later inherit the cache.
        mel.mel(torch.zeros(mel.n_fft))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # At the level convention recorded with the model (--audio_peak): teacher forcing reads its clips the same way.
        return self.tokens[index], self.mel.mel(torch.from_numpy(self.mel.load(self.rows[index].audio_path)))


def tacotron2_loss(mel: torch.Tensor, mel_postnet: torch.Tensor, gate: torch.Tensor, mel_target: torch.Tensor,
                   gate_target: torch.Tensor, output_lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(total, mel MSE, post-net mel MSE, stop-token BCE), each averaged over the real frames of the batch only.

    NVIDIA averages over the padding too, which weighs a clip by the longest one in its batch; masking makes the
    loss of a clip independent of what it was batched with.
    """
    valid = ~padding_mask(output_lengths.to(mel_target.device), mel_target.shape[2])
    frames = valid.sum()

    def masked_mse(prediction: torch.Tensor) -> torch.Tensor:
        squared = (prediction.float() - mel_target.float()).pow(2) * valid[:, None, :]
        return squared.sum() / (frames * mel_target.shape[1])

    loss_mel, loss_postnet = masked_mse(mel), masked_mse(mel_postnet)
    loss_gate = (F.binary_cross_entropy_with_logits(gate.float(), gate_target.float(), reduction="none")
                 * valid).sum() / frames
    return loss_mel + loss_postnet + loss_gate, loss_mel, loss_postnet, loss_gate


def train_step(accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...],
               grad_clip: float) -> dict[str, torch.Tensor | bool]:
    """One optimiser step on a `collate` batch with the *prepared* model and optimiser (`accelerator`: the run's
    accelerate Accelerator): the losses (detached), the gradient norm before clipping (`grad_clip` 0: none), and
    "optimiser_stepped": False when a non-finite gradient (which a non-finite loss gives) skipped the step, leaving
    weights, batch-norm statistics and optimiser state as they were. Gradients are all-reduced, so every process
    takes the same decision."""
    text, text_lengths, mel, gate, output_lengths = batch
    # The batch norms' running statistics, which the forward pass updates: put back if the step is skipped.
    buffers = [buffer.detach().clone() for buffer in model.buffers()]
    mel_out, mel_postnet, gate_out, _ = model(text, text_lengths, mel, output_lengths)
    loss, loss_mel, loss_postnet, loss_gate = tacotron2_loss(mel_out, mel_postnet, gate_out, mel, gate, output_lengths)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    else:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
    return {"loss": loss.detach(), "loss_mel": loss_mel.detach(), "loss_mel_postnet": loss_postnet.detach(),
            "loss_gate": loss_gate.detach(), "grad_norm": grad_norm, "optimiser_stepped": finite}
