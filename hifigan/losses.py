"""The HiFi-GAN losses (LSGAN, feature matching, mel L1) and one training step of generator and discriminators."""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from utils import mel_spectrogram

if TYPE_CHECKING:  # train_step only calls methods of the Accelerator it is given
    from accelerate import Accelerator

# ---------------------------------------------------------------------------------------------
# Losses (LSGAN, feature matching, mel L1)
# ---------------------------------------------------------------------------------------------

def discriminator_loss(real_scores: list[torch.Tensor], fake_scores: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN: real scores pushed to 1, generated ones to 0, summed over sub-discriminators."""
    return sum(torch.mean((1 - real) ** 2) + torch.mean(fake ** 2) for real, fake in zip(real_scores, fake_scores))


def generator_loss(fake_scores: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN: generated scores pushed to 1."""
    return sum(torch.mean((1 - fake) ** 2) for fake in fake_scores)


def feature_matching_loss(real_fmaps: list[list[torch.Tensor]], fake_fmaps: list[list[torch.Tensor]]) -> torch.Tensor:
    """L1 between discriminator features of real and generated audio (unweighted; the paper weights it x2)."""
    return sum(torch.mean(torch.abs(real.detach() - fake))
               for real_layers, fake_layers in zip(real_fmaps, fake_fmaps)
               for real, fake in zip(real_layers, fake_layers))


def mel_loss(mel: torch.Tensor, mel_generated: torch.Tensor) -> torch.Tensor:
    """L1 between log-mels (unweighted; the paper weights it x45)."""
    return F.l1_loss(mel_generated, mel)


# ---------------------------------------------------------------------------------------------
# One training step (train.py, bench.py)
# ---------------------------------------------------------------------------------------------

def step_if_finite(accelerator: Accelerator, optimizer: torch.optim.Optimizer, finite: torch.Tensor
                   ) -> torch.Tensor | bool:
    """Step unless `finite` (a 0-d bool tensor) is False; returns whether it stepped.

    Fused AdamW skips on the device: its kernel reads `found_inf` (the hook torch.amp.GradScaler uses), so the step
    needs no host synchronisation and the result stays a tensor. Other optimisers, and fp16's GradScaler (which
    sets `found_inf` itself), read the flag on the host."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    if accelerator.scaler is None and getattr(inner, "_step_supports_amp_scaling", False) and \
            inner.defaults.get("fused"):
        inner.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
        return finite
    finite = bool(finite)
    if finite:
        optimizer.step()
    elif accelerator.scaler is not None:
        # fp16: step() is what updates the GradScaler; skipping it must still lower the loss scale, or the
        # next unscale_ finds the scaler stale and fails.
        accelerator.scaler.update()
    return finite


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module):
    """No parameter gradients for these modules inside the block (gradients still flow through them to their
    inputs); requires_grad is restored after."""
    parameters = [p for module in modules for p in module.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def train_step(accelerator: Accelerator, generator: torch.nn.Module, mpd: torch.nn.Module, msd: torch.nn.Module,
               optim_g: torch.optim.Optimizer, optim_d: torch.optim.Optimizer, mel: torch.Tensor, audio: torch.Tensor,
               loss_mel_target: torch.Tensor, mel_kwargs_loss: dict, lambda_mel: float = 45.0,
               lambda_feature_matching: float = 2.0) -> dict[str, torch.Tensor | bool]:
    """One HiFi-GAN step: discriminators, then generator (official order). Returns losses and grad norms.

    An optimiser whose loss or gradient norm is not finite does not step (its weights stay untouched);
    `<name>_stepped` says which stepped. Gradients are all-reduced first, so every process agrees. With fused
    AdamW (train.py's) nothing here waits for the GPU: losses, norms and flags come back as device tensors, and the
    caller fetches them when it logs.
    """
    audio = audio.unsqueeze(1)
    audio_generated = generator(mel)
    with torch.autocast(accelerator.device.type, enabled=False):  # the mel loss in full precision
        mel_generated = mel_spectrogram(audio_generated.squeeze(1).float(), **mel_kwargs_loss)

    # Discriminator step, on generated audio detached from the generator.
    optim_d.zero_grad(set_to_none=True)
    real, fake, _, _ = mpd(audio, audio_generated.detach())
    loss_disc = discriminator_loss(real, fake)
    real, fake, _, _ = msd(audio, audio_generated.detach())
    loss_disc = loss_disc + discriminator_loss(real, fake)
    accelerator.backward(loss_disc)
    grad_norm_d = accelerator.clip_grad_norm_(itertools.chain(mpd.parameters(), msd.parameters()), math.inf)
    discriminator_stepped = step_if_finite(accelerator, optim_d,
                                           torch.isfinite(loss_disc.detach()) & torch.isfinite(grad_norm_d))

    # Generator step: adversarial + feature matching + mel L1, through the just-updated discriminators.
    # Their own gradients from this pass would be thrown away, so they are not computed (frozen: the backward skips
    # their weight gradients, and the real audio's pass builds no graph at all), and under DDP nothing of theirs is
    # all-reduced (no_sync).
    optim_g.zero_grad(set_to_none=True)
    with accelerator.no_sync(mpd), accelerator.no_sync(msd), frozen(mpd, msd):
        _, fake_period, fmap_real_period, fmap_fake_period = mpd(audio, audio_generated)
        _, fake_scale, fmap_real_scale, fmap_fake_scale = msd(audio, audio_generated)
        loss_mel = mel_loss(loss_mel_target, mel_generated)
        loss_fm = feature_matching_loss(fmap_real_period, fmap_fake_period) + \
            feature_matching_loss(fmap_real_scale, fmap_fake_scale)
        loss_adv = generator_loss(fake_period) + generator_loss(fake_scale)
        loss_gen = loss_adv + lambda_feature_matching * loss_fm + lambda_mel * loss_mel
        accelerator.backward(loss_gen)
    grad_norm_g = accelerator.clip_grad_norm_(generator.parameters(), math.inf)
    generator_stepped = step_if_finite(accelerator, optim_g,
                                       torch.isfinite(loss_gen.detach()) & torch.isfinite(grad_norm_g))
    optim_g.zero_grad(set_to_none=True)
    return {"loss_generator": loss_gen.detach(), "loss_discriminator": loss_disc.detach(),
            "loss_mel": loss_mel.detach(), "loss_feature_matching": loss_fm.detach(),
            "loss_adversarial": loss_adv.detach(), "grad_norm_generator": grad_norm_g,
            "grad_norm_discriminator": grad_norm_d, "discriminator_stepped": discriminator_stepped,
            "generator_stepped": generator_stepped}

