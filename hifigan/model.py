"""The HiFi-GAN networks (Kong et al., 2020): the generator and the multi-period and multi-scale discriminators.

Class names follow the paper's boxes and the official jik876/hifi-gan `models.py`; state-dict tensors have the
official shapes (hifigan.checkpoint reads the official files). One set of layers serves fp32 and the channels-last
half-precision layout (`conv`, `channels_last`).
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from hifigan.config import HifiGanConfig, resolve_config

LRELU_SLOPE = 0.1


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------

def get_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def init_weights(module: nn.Module, mean: float = 0.0, std: float = 0.01) -> None:
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        module.weight.data.normal_(mean, std)


def conv(module: nn.Conv1d | nn.ConvTranspose1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a 1-D convolution (or the period discriminators' (k, 1) Conv2d, a k-tap conv along time) to `x`:
    [N, C, T] as usual, or [N, C, 1, T] in channels-last memory, where the same weights run as (1, k) 2-D kernels.

    Why two layouts: in half precision cuDNN computes in channels-last (NHWC) and transposes every NCHW activation
    in and out around each convolution -- thousands of transposes a training step. Keeping the activations
    channels-last all the way through (`Generator.channels_last`, `channels_last(...)`) removes them; the numbers are
    the same convolutions'."""
    weight = module.weight
    if weight.dim() == 4:  # (k, 1) Conv2d
        weight = weight.squeeze(-1)
    transposed = isinstance(module, nn.ConvTranspose1d)
    stride, padding, dilation = module.stride[0], module.padding[0], module.dilation[0]
    if x.dim() == 3:
        if transposed:
            return F.conv_transpose1d(x, weight, module.bias, stride, padding, module.output_padding[0],
                                      module.groups, dilation)
        return F.conv1d(x, weight, module.bias, stride, padding, dilation, module.groups)
    weight = weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    if transposed:
        return F.conv_transpose2d(x, weight, module.bias, (1, stride), (0, padding), (0, module.output_padding[0]),
                                  module.groups, (1, dilation))
    return F.conv2d(x, weight, module.bias, (1, stride), (0, padding), (1, dilation), module.groups)


def conv_fp32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`conv` in float32 even under autocast: for the layers that read or write the waveform itself. In bf16 the
    audio would carry 8 significant bits (a noise floor ~50 dB down, which the log-mel loss and the discriminators
    would see); these layers have one channel on the waveform side and cost little in fp32."""
    if not torch.is_autocast_enabled(x.device.type):  # a model cast to half as a whole stays as it was cast
        return conv(module, x)
    with torch.autocast(x.device.type, enabled=False):
        return conv(module, x.float())


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """[N, C, T] -> [N, C, 1, T] in channels-last memory (see `conv`)."""
    return x.unsqueeze(2).contiguous(memory_format=torch.channels_last)


def channels_last(*modules: nn.Module, enabled: bool = True) -> None:
    """Run these networks' convolutions in channels-last memory (inputs and outputs keep their usual shapes):
    the fast layout for bf16/fp16 on a GPU. Feature maps come out as [N, C, 1, T]; the losses only average them."""
    for module in modules:
        for sub in module.modules():
            if hasattr(sub, "channels_last"):
                sub.channels_last = enabled


def full_precision(*modules: nn.Module, enabled: bool = True) -> None:
    """Run these networks (Generator, MultiPeriodDiscriminator, MultiScaleDiscriminator) in float32 even under
    autocast, e.g. the generator while the discriminators run in bf16 (train.py --mixed_precision_networks)."""
    for module in modules:
        module.full_precision = enabled


def _honours_full_precision(forward):
    """A network's forward, with autocast turned off inside when the network is marked `full_precision`."""
    @functools.wraps(forward)
    def run(self: nn.Module, x: torch.Tensor, *more: torch.Tensor):
        if self.full_precision and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return forward(self, x, *more)
        return forward(self, x, *more)
    return run


class ResBlock1(nn.Module):
    """MRF residual block, V1/V2 flavour: per dilation, a dilated conv then a plain conv."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: tuple[int, ...] = (1, 3, 5)):
        super().__init__()
        self.convs1 = nn.ModuleList([
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=get_padding(kernel_size, d)))
            for d in dilation])
        self.convs2 = nn.ModuleList([
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=1, padding=get_padding(kernel_size)))
            for _ in dilation])
        self.convs1.apply(init_weights)
        self.convs2.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            xt = conv(conv1, F.leaky_relu(x, LRELU_SLOPE))
            xt = conv(conv2, F.leaky_relu(xt, LRELU_SLOPE))
            x = x + xt
        return x


class ResBlock2(nn.Module):
    """MRF residual block, V3 flavour: one dilated conv per dilation."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: tuple[int, ...] = (1, 3)):
        super().__init__()
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=get_padding(kernel_size, d)))
            for d in dilation])
        self.convs.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.convs:
            x = x + conv(layer, F.leaky_relu(x, LRELU_SLOPE))
        return x


class Generator(nn.Module):
    """Mel [B, num_mels, frames] -> audio [B, 1, frames * prod(upsample_rates)]."""

    def __init__(self, config: HifiGanConfig):
        super().__init__()
        self.config = config
        self.num_kernels = len(config.resblock_kernel_sizes)
        self.num_upsamples = len(config.upsample_rates)
        channels = config.upsample_initial_channel
        self.conv_pre = weight_norm(nn.Conv1d(config.num_mels, channels, 7, 1, padding=3))
        resblock = ResBlock1 if config.resblock == "1" else ResBlock2
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
            self.ups.append(weight_norm(nn.ConvTranspose1d(channels // 2 ** i, channels // 2 ** (i + 1),
                                                           kernel, rate, padding=(kernel - rate) // 2)))
            for kernel_size, dilation in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(resblock(channels // 2 ** (i + 1), kernel_size, dilation))
        self.conv_post = weight_norm(nn.Conv1d(channels // 2 ** self.num_upsamples, 1, 7, 1, padding=3))
        self.ups.apply(init_weights)
        self.conv_post.apply(init_weights)
        self.channels_last = False  # model.channels_last()
        self.full_precision = False  # model.full_precision()

    @_honours_full_precision
    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = conv(self.conv_pre, to_channels_last(mel) if self.channels_last else mel)
        for i, up in enumerate(self.ups):
            x = conv(up, F.leaky_relu(x, LRELU_SLOPE))
            # Multi-receptive-field fusion: the average of parallel residual blocks with different kernels.
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            fused = blocks[0](x)
            for block in blocks[1:]:
                fused += block(x)  # in place: sum() would start from 0 + tensor, one more pass over the activations
            x = fused / self.num_kernels
        # The official model uses leaky_relu's default slope (0.01) here, not LRELU_SLOPE; keep it
        # so the published weights reproduce their audio.
        x = conv_fp32(self.conv_post, F.leaky_relu(x))
        return torch.tanh(x if x.dim() == 3 else x.squeeze(2))

    def remove_weight_norm(self) -> Generator:
        """Fold weight norm into plain weights (for inference and export); returns self."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return self

    def folded_copy(self) -> Generator:
        """A new float32 CPU Generator with these weights, weight norm folded; this one is left as it is.

        Not copy.deepcopy: parametrized modules share a generated class, and folding a deep copy would strip
        the `weight` property from the original too."""
        copy = Generator(self.config).remove_weight_norm()
        copy.load_state_dict(fold_weight_norm_tensors({k: v.detach().float().cpu()
                                                        for k, v in self.state_dict().items()}))
        return copy.eval()


def fold_weight_norm_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn (weight_g, weight_v) pairs of a state dict into plain `weight` tensors (norm over all dims but 0)."""
    folded = {}
    for key, value in state_dict.items():
        if key.endswith(".parametrizations.weight.original1"):
            prefix = key[: -len("parametrizations.weight.original1")]
            g = state_dict[prefix + "parametrizations.weight.original0"]
            folded[prefix + "weight"] = torch._weight_norm(value, g, 0)
        elif not key.endswith(".parametrizations.weight.original0"):
            folded[key] = value
    return folded


def build_generator(config: HifiGanConfig | dict | str | None = "v1") -> Generator:
    """A freshly initialised Generator from a preset name, a config dict/dataclass or a config.json path."""
    return Generator(resolve_config(config))


# ---------------------------------------------------------------------------------------------
# Discriminators
# ---------------------------------------------------------------------------------------------

class DiscriminatorP(nn.Module):
    """Looks at the waveform folded into [T / period, period]: 2-D convs with (k, 1) kernels see one phase."""

    def __init__(self, period: int, kernel_size: int = 5, stride: int = 3, width_divisor: int = 1):
        super().__init__()
        self.period = period
        channels = [1] + [c // width_divisor for c in (32, 128, 512, 1024)]
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv2d(c_in, c_out, (kernel_size, 1), (stride, 1), padding=(get_padding(5, 1), 0)))
            for c_in, c_out in itertools.pairwise(channels)])
        self.convs.append(weight_norm(nn.Conv2d(channels[-1], channels[-1], (kernel_size, 1), 1, padding=(2, 0))))
        self.conv_post = weight_norm(nn.Conv2d(channels[-1], 1, (3, 1), 1, padding=(1, 0)))
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        batch, channels, length = x.shape
        if length % self.period != 0:
            pad = self.period - length % self.period
            x = F.pad(x, (0, pad), "reflect")
            length += pad
        # The official model convolves the [T / period, period] image with (k, 1) kernels: each of the `period`
        # phases of the waveform on its own. Here the phases are folded into the batch and convolved as 1-D
        # sequences with the same weights -- the same numbers, but long contiguous rows instead of an image a few
        # samples wide, which is what convolution kernels are fast on (CPU and GPU; bench.py). The feature maps
        # stay folded ([batch * period, channels, frames]): the losses only average over them.
        x = x.view(batch, channels, length // self.period, self.period).permute(0, 3, 1, 2)
        x = x.reshape(batch * self.period, channels, length // self.period)
        x, feature_maps = _conv_stack(self.convs, self.conv_post, to_channels_last(x) if self.channels_last else x)
        # The score in the official order (frame-major, then phase).
        return x.view(batch, self.period, -1).transpose(1, 2).flatten(1), feature_maps


def _conv_stack(convs: nn.ModuleList, conv_post: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """A discriminator's body: leaky-ReLU convs (the first, on the waveform, in fp32), then conv_post; every
    layer's output is a feature map."""
    feature_maps = []
    for i, layer in enumerate(convs):
        x = F.leaky_relu((conv_fp32 if i == 0 else conv)(layer, x), LRELU_SLOPE)
        feature_maps.append(x)
    x = conv(conv_post, x)
    feature_maps.append(x)
    return x, feature_maps


class MultiPeriodDiscriminator(nn.Module):
    def __init__(self, periods: tuple[int, ...] = (2, 3, 5, 7, 11), width_divisor: int = 1):
        super().__init__()
        self.discriminators = nn.ModuleList([DiscriminatorP(p, width_divisor=width_divisor) for p in periods])
        self.full_precision = False

    @_honours_full_precision
    def forward(self, audio: torch.Tensor, audio_generated: torch.Tensor):
        """Scores and feature maps for real and generated audio: (real_scores, fake_scores, real_fmaps, fake_fmaps)."""
        return _run_discriminators(self.discriminators, [None] * len(self.discriminators), audio, audio_generated)


class DiscriminatorS(nn.Module):
    """Grouped strided 1-D convs over the raw (or pooled) waveform."""

    def __init__(self, use_spectral_norm: bool = False, width_divisor: int = 1):
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        c128, c256, c512, c1024 = (c // width_divisor for c in (128, 256, 512, 1024))
        self.convs = nn.ModuleList([
            norm(nn.Conv1d(1, c128, 15, 1, padding=7)),
            norm(nn.Conv1d(c128, c128, 41, 2, groups=4, padding=20)),
            norm(nn.Conv1d(c128, c256, 41, 2, groups=16, padding=20)),
            norm(nn.Conv1d(c256, c512, 41, 4, groups=16, padding=20)),
            norm(nn.Conv1d(c512, c1024, 41, 4, groups=16, padding=20)),
            norm(nn.Conv1d(c1024, c1024, 41, 1, groups=16, padding=20)),
            norm(nn.Conv1d(c1024, c1024, 5, 1, padding=2)),
        ])
        self.conv_post = norm(nn.Conv1d(c1024, 1, 3, 1, padding=1))
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, feature_maps = _conv_stack(self.convs, self.conv_post, to_channels_last(x) if self.channels_last else x)
        return torch.flatten(x, 1, -1), feature_maps


class MultiScaleDiscriminator(nn.Module):
    """Three DiscriminatorS on raw, x2 and x4 average-pooled audio; spectral norm on the raw scale (paper §2.3)."""

    def __init__(self, width_divisor: int = 1):
        super().__init__()
        self.discriminators = nn.ModuleList([DiscriminatorS(use_spectral_norm=True, width_divisor=width_divisor),
                                             DiscriminatorS(width_divisor=width_divisor),
                                             DiscriminatorS(width_divisor=width_divisor)])
        self.meanpools = nn.ModuleList([nn.AvgPool1d(4, 2, padding=2), nn.AvgPool1d(4, 2, padding=2)])
        self.full_precision = False

    @_honours_full_precision
    def forward(self, audio: torch.Tensor, audio_generated: torch.Tensor):
        return _run_discriminators(self.discriminators, [None, *self.meanpools], audio, audio_generated)


def _run_discriminators(discriminators, pools, audio, audio_generated):
    real_scores, fake_scores, real_fmaps, fake_fmaps = [], [], [], []
    for discriminator, pool in zip(discriminators, pools):
        if pool is not None:  # pools compound: scale i sees audio pooled i times
            audio, audio_generated = pool(audio), pool(audio_generated)
        score, fmap = discriminator(audio)
        real_scores.append(score)
        real_fmaps.append(fmap)
        score, fmap = discriminator(audio_generated)
        fake_scores.append(score)
        fake_fmaps.append(fmap)
    return real_scores, fake_scores, real_fmaps, fake_fmaps

