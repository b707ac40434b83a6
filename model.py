"""HiFi-GAN (Kong et al., 2020): generator, multi-period and multi-scale discriminators, losses, loading.

Class names follow the paper's boxes and the official jik876/hifi-gan code; state-dict tensors have
the official shapes, and `load_generator` reads the official checkpoints as well as this repo's export.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import hub
from utils import MelConfig, UserError, mel_spectrogram

if TYPE_CHECKING:  # train_step only calls methods of the Accelerator it is given
    from accelerate import Accelerator

LRELU_SLOPE = 0.1


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class HifiGanConfig:
    """Every hyper-parameter needed to rebuild the generator and its mel; serialised (flat) as config.json.

    Checked on construction (`check`), so a config from flags, a preset or a config.json cannot build a model that
    cannot work; train.py's model and mel flags are generated from these fields (utils.add_config_flags).
    """
    resblock: str = field(default="1", metadata={"choices": ["1", "2"], "help": "1: V1/V2 MRF blocks; 2: V3's"})
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = field(
        default=((1, 3, 5), (1, 3, 5), (1, 3, 5)), metadata={"help": "'((1,3,5),(1,3,5),(1,3,5))'"})
    mpd_periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    # 1 = the official discriminators. A larger divisor thins every discriminator layer; it exists
    # for quick experiments and the test suite, where the 70 M official parameters dominate a step.
    discriminator_width_divisor: int = field(default=1, metadata={
        "help": "thin every discriminator layer by this factor (1 = official; tests use 8)"})
    # The mel the generator consumes (utils.MelConfig; docs/design.md).
    sampling_rate: int = 22050
    num_mels: int = 80
    n_fft: int = 1024
    window_size: int = 1024
    hop_size: int = 256
    fmin: float = 0.0
    fmax: float | None = 8000.0
    fmax_loss: float | None = field(default=None, metadata={"help": "mel-loss fmax (default: sampling_rate / 2)"})
    mel_scale: str = field(default="log", metadata={"choices": ["log", "db"],
                                                    "help": "log: natural log (official); db: the tutorial's scale"})
    min_db: float = -100.0
    max_scaled_abs: float = 4.0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """A UserError naming the fix for a combination that cannot work."""
        if math.prod(self.upsample_rates) != self.hop_size:
            raise UserError(f"the upsample rates {tuple(self.upsample_rates)} multiply to "
                            f"{math.prod(self.upsample_rates)}, but the generator must upsample each mel frame by "
                            f"--hop_size {self.hop_size}; make their product the hop size")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise UserError("--upsample_rates and --upsample_kernel_sizes need the same number of values")
        for rate, kernel in zip(self.upsample_rates, self.upsample_kernel_sizes):
            # A transposed conv with padding (kernel - rate) / 2 makes exactly rate samples per input sample only
            # when kernel - rate is even and not negative; otherwise the audio drifts off frames x hop.
            if kernel < rate or (kernel - rate) % 2:
                raise UserError(f"upsample kernel {kernel} does not fit rate {rate}: a kernel must be at least its "
                                f"rate and differ from it by an even number (2 x rate is usual: {2 * rate})")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise UserError("--resblock_kernel_sizes and --resblock_dilation_sizes need the same number of entries")
        if self.discriminator_width_divisor not in (1, 2, 4, 8):
            # The scale discriminators' grouped convs need 16 | 128 / divisor channels.
            raise UserError(f"--discriminator_width_divisor {self.discriminator_width_divisor}: choose 1, 2, 4 or 8")
        if self.resblock not in ("1", "2"):
            raise UserError(f"--resblock {self.resblock!r}: choose 1 or 2")
        if self.fmax_loss is not None and self.fmax_loss > self.sampling_rate / 2:
            raise UserError(f"--fmax_loss {self.fmax_loss} is above the Nyquist frequency "
                            f"({self.sampling_rate / 2:g} Hz); lower it or leave it out")
        self.mel.checked()

    @property
    def mel(self) -> MelConfig:
        """The generator's input mel: the vocoder's frames, and the official pretraining level (0.95 peak)."""
        return MelConfig(sampling_rate=self.sampling_rate, num_mels=self.num_mels, n_fft=self.n_fft,
                         window_size=self.window_size, hop_size=self.hop_size, fmin=self.fmin, fmax=self.fmax,
                         mel_scale=self.mel_scale, min_db=self.min_db, max_scaled_abs=self.max_scaled_abs)

    def mel_kwargs(self, for_loss: bool = False) -> dict:
        """Keyword arguments of utils.mel_spectrogram for the input mel (or the loss mel, up to fmax_loss)."""
        return {**self.mel.kwargs(), "fmax": self.fmax_loss} if for_loss else self.mel.kwargs()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> HifiGanConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        # JSON turns tuples into lists; keep tuples so configs compare equal after a round trip.
        for key, value in values.items():
            if isinstance(value, list):
                values[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> HifiGanConfig:
        if name not in PRESETS:
            raise UserError(f"unknown config {name!r}; choose one of {', '.join(PRESETS)} or give a config.json path")
        return dataclasses.replace(PRESETS[name], **overrides)


# v1/v2/v3: the official 22.05 kHz configs (config_v1/v2/v3.json of jik876/hifi-gan). The other rates keep V1's
# generator (change its width with --upsample_initial_channel, e.g. 128 for a V2-sized model) and take their mel
# from published vocoders at that rate; the hop stays the product of the upsampling rates, the window and FFT
# cover about 46 ms, and the mel reaches the band the rate carries.
PRESETS: dict[str, HifiGanConfig] = {
    "v1": HifiGanConfig(),
    "v2": HifiGanConfig(upsample_initial_channel=128),
    "v3": HifiGanConfig(resblock="2", upsample_rates=(8, 8, 4), upsample_kernel_sizes=(16, 16, 8),
                        upsample_initial_channel=256, resblock_kernel_sizes=(3, 5, 7),
                        resblock_dilation_sizes=((1, 2), (2, 6), (3, 12))),
    # SpeechBrain's LibriTTS 16 kHz HiFi-GAN: the 22.05 kHz STFT settings at 16 kHz, mel up to Nyquist.
    "16khz": HifiGanConfig(sampling_rate=16000, fmax=8000.0),
    # BigVGAN's 24 kHz 100-band 256x setting (bigvgan_24khz_100band): mel up to Nyquist.
    "24khz": HifiGanConfig(sampling_rate=24000, num_mels=100, fmax=12000.0),
    # BigVGAN-v2's 44 kHz 128-band 512x setting (bigvgan_v2_44khz_128band_512x): a 2048-sample STFT, hop 512,
    # mel up to Nyquist; the 512x upsampling as 8 x 8 x 4 x 2, the four-stage layout of NeMo's 44.1 kHz HiFi-GAN.
    "44khz": HifiGanConfig(sampling_rate=44100, num_mels=128, n_fft=2048, window_size=2048, hop_size=512,
                           fmax=None, upsample_rates=(8, 8, 4, 2), upsample_kernel_sizes=(16, 16, 8, 4)),
    # The 44 kHz setting at 48 kHz (hop 512 = 10.7 ms).
    "48khz": HifiGanConfig(sampling_rate=48000, num_mels=128, n_fft=2048, window_size=2048, hop_size=512,
                           fmax=None, upsample_rates=(8, 8, 4, 2), upsample_kernel_sizes=(16, 16, 8, 4)),
}
# A training crop of 32 frames: 8192 samples at hop 256 (the official segment), 16384 at hop 512.
SEGMENT_FRAMES = 32


def resolve_config(config: HifiGanConfig | dict | str | os.PathLike | None) -> HifiGanConfig:
    """A config from a dataclass, a dict, a preset name ("v1") or a config.json path."""
    if config is None:
        return HifiGanConfig()
    if isinstance(config, HifiGanConfig):
        return config
    if isinstance(config, dict):
        return HifiGanConfig.from_dict(config)
    if str(config).lower() in PRESETS:
        return PRESETS[str(config).lower()]
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"config {config} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")
    return HifiGanConfig.from_dict(json.loads(path.read_text()))


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
        copy.load_state_dict(_fold_weight_norm_tensors({k: v.detach().float().cpu()
                                                         for k, v in self.state_dict().items()}))
        return copy.eval()


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
        feature_maps = []
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
        if self.channels_last:
            x = to_channels_last(x)
        for i, layer in enumerate(self.convs):
            x = F.leaky_relu((conv_fp32 if i == 0 else conv)(layer, x), LRELU_SLOPE)
            feature_maps.append(x)
        x = conv(self.conv_post, x)
        feature_maps.append(x)
        # The score in the official order (frame-major, then phase).
        return x.view(batch, self.period, -1).transpose(1, 2).flatten(1), feature_maps


class MultiPeriodDiscriminator(nn.Module):
    def __init__(self, periods: tuple[int, ...] = (2, 3, 5, 7, 11), width_divisor: int = 1):
        super().__init__()
        self.discriminators = nn.ModuleList([DiscriminatorP(p, width_divisor=width_divisor) for p in periods])

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
        feature_maps = []
        if self.channels_last and x.dim() == 3:
            x = to_channels_last(x)
        for i, layer in enumerate(self.convs):
            x = F.leaky_relu((conv_fp32 if i == 0 else conv)(layer, x), LRELU_SLOPE)
            feature_maps.append(x)
        x = conv(self.conv_post, x)
        feature_maps.append(x)
        return torch.flatten(x, 1, -1), feature_maps


class MultiScaleDiscriminator(nn.Module):
    """Three DiscriminatorS on raw, x2 and x4 average-pooled audio; spectral norm on the raw scale (paper §2.3)."""

    def __init__(self, width_divisor: int = 1):
        super().__init__()
        self.discriminators = nn.ModuleList([DiscriminatorS(use_spectral_norm=True, width_divisor=width_divisor),
                                             DiscriminatorS(width_divisor=width_divisor),
                                             DiscriminatorS(width_divisor=width_divisor)])
        self.meanpools = nn.ModuleList([nn.AvgPool1d(4, 2, padding=2), nn.AvgPool1d(4, 2, padding=2)])

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
    # Their own gradients from this pass are thrown away (zeroed before the next discriminator step),
    # so under DDP they need not be all-reduced: no_sync saves that communication.
    optim_g.zero_grad(set_to_none=True)
    with accelerator.no_sync(mpd), accelerator.no_sync(msd):
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


# ---------------------------------------------------------------------------------------------
# Checkpoints: official names <-> parametrization names, loading (docs/design.md §3)
# ---------------------------------------------------------------------------------------------

# torch.nn.utils.parametrizations names its tensors differently from the old hooks the official
# code used; the shapes are identical, so converting is a renaming.
_WEIGHT_NORM_NAMES = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
_SPECTRAL_NORM_NAMES = {"weight_orig": "parametrizations.weight.original", "weight_u": "parametrizations.weight.0._u",
                        "weight_v": "parametrizations.weight.0._v"}


def from_official_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official (jik876) state dict to this repo's parametrization names."""
    spectral_prefixes = {key[:-len("weight_orig")] for key in state_dict if key.endswith("weight_orig")}
    renamed = {}
    for key, value in state_dict.items():
        prefix, _, name = key.rpartition(".")
        prefix = prefix + "." if prefix else ""
        names = _SPECTRAL_NORM_NAMES if prefix in spectral_prefixes else _WEIGHT_NORM_NAMES
        renamed[prefix + names[name] if name in names else key] = value
    return renamed


def to_official_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of from_official_names: the names the official code and checkpoints use."""
    inverse = [(v, k) for names in (_WEIGHT_NORM_NAMES, _SPECTRAL_NORM_NAMES) for k, v in names.items()]
    renamed = {}
    for key, value in state_dict.items():
        for long_name, short_name in inverse:
            if key.endswith("." + long_name) or key == long_name:
                key = key[: len(key) - len(long_name)] + short_name
                break
        renamed[key] = value
    return renamed


def _fold_weight_norm_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _unfold_weight_norm_tensors(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                                 ) -> dict[str, torch.Tensor]:
    """Inverse of _fold_weight_norm_tensors for the keys `expected` has: g = ||w|| per output, v = w."""
    unfolded = {}
    for key in expected:
        if key.endswith(".parametrizations.weight.original0") and key not in state_dict:
            weight = state_dict.get(key.removesuffix("parametrizations.weight.original0") + "weight")
            if weight is not None:
                unfolded[key] = torch.norm_except_dim(weight, 2, 0)
        elif key.endswith(".parametrizations.weight.original1") and key not in state_dict:
            weight = state_dict.get(key.removesuffix("parametrizations.weight.original1") + "weight")
            if weight is not None:
                unfolded[key] = weight
    folded_keys = {k.removesuffix("parametrizations.weight.original0") + "weight" for k in unfolded}
    return {**{k: v for k, v in state_dict.items() if k not in folded_keys}, **unfolded}


def guess_official_config(state_dict: dict[str, torch.Tensor]) -> str:
    """V1/V2/V3 from tensor shapes: conv_pre width 512/128/256; V3 has the two-conv resblock."""
    weight = state_dict.get("conv_pre.weight_v", state_dict.get("conv_pre.parametrizations.weight.original1",
                                                                 state_dict.get("conv_pre.weight")))
    if weight is None:
        raise UserError("not a HiFi-GAN generator state dict: no conv_pre weight found")
    width = weight.shape[0]
    two_conv = any(".convs." in key for key in state_dict if key.startswith("resblocks."))
    if two_conv or width == 256:
        return "v3"
    return {512: "v1", 128: "v2"}.get(width) or _raise(
        UserError(f"conv_pre has {width} channels, which matches no official config; pass config= explicitly"))


def _raise(error: Exception):
    raise error


def _torch_load(path: str | os.PathLike) -> dict:
    # weights_only=True: loading a checkpoint must never run code from it.
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as error:
        raise UserError(f"refusing to load {path}: it is not a plain tensor checkpoint "
                        f"(torch.load weights_only=True failed: {str(error).splitlines()[0]})") from None


def _check_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor], path, config_name: str) -> None:
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise UserError(f"{path}: missing tensor {key} for config {config_name}; "
                            "is it a checkpoint of another model or config?")
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            guess = ""
            try:
                guess = f"; the file looks like {guess_official_config(state_dict)}"
            except UserError:
                pass
            raise UserError(f"{path}: tensor {key} has shape {tuple(state_dict[key].shape)} but config {config_name} "
                            f"needs {tuple(tensor.shape)}{guess}")


def load_generator(path: str | os.PathLike, config: HifiGanConfig | dict | str | None = None,
                   device: str | torch.device = "cpu") -> Generator:
    """A ready Generator in eval mode from this repo's export or an official jik876 generator file.

    Repo export: a folder (or its `generator.safetensors`) with `config.json` beside it, or a Hugging Face Hub repo
    holding one, `hf://owner/name[@revision]` (hub.py). Official file (`g_XXXXXXXX`, `generator_v1`):
    {"generator": state_dict}; with config=None the preset is guessed from the tensor shapes and announced. A
    `config` (preset name, dict, dataclass, json path) overrides.
    """
    if hub.is_hub_id(path):
        path = hub.download(str(path))
    path = Path(path)
    if path.is_dir():
        path = path / "generator.safetensors"
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state_dict = load_file(str(path))
        if config is None:
            if not (path.parent / "config.json").is_file():
                raise UserError(f"{path} has no config.json beside it; pass --config with a preset (v1, v2, ...) "
                                "or a config.json")
            config = path.parent / "config.json"
        config_name = str(config)
    else:
        checkpoint = _torch_load(path)
        if isinstance(checkpoint, dict) and "generator" in checkpoint:
            state_dict = checkpoint["generator"]
        elif isinstance(checkpoint, dict) and ("mpd" in checkpoint or "msd" in checkpoint):
            raise UserError(f"{path} is a discriminator checkpoint (keys mpd/msd), not a generator; use its g_ file")
        elif isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            state_dict = checkpoint
        else:
            keys = list(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise UserError(f"{path} is not a HiFi-GAN generator checkpoint (found {keys})")
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        if config is None:
            config = guess_official_config(state_dict)
            warnings.warn(f"{path} carries no config; its tensor shapes say HiFi-GAN {config.upper()}", stacklevel=2)
        config_name = str(config)
    generator = Generator(resolve_config(config))
    # Always hand back a weight-normed generator (trainable, finetunable); a file with folded
    # weights (this repo's export) gets its (g, v) re-derived. Inference folds it again.
    state_dict = _unfold_weight_norm_tensors(from_official_names(state_dict), generator.state_dict())
    _check_shapes(generator, state_dict, path, config_name)
    generator.load_state_dict(state_dict)
    return generator.to(device).eval()


def load_discriminators(path: str | os.PathLike, mpd: MultiPeriodDiscriminator,
                        msd: MultiScaleDiscriminator) -> None:
    """Load an official `do_XXXXXXXX` file (keys mpd, msd) or this repo's equivalent into the given modules."""
    checkpoint = _torch_load(path)
    if not (isinstance(checkpoint, dict) and "mpd" in checkpoint and "msd" in checkpoint):
        raise UserError(f"{path} is not a discriminator checkpoint (expected keys mpd and msd)")
    for name, module in (("mpd", mpd), ("msd", msd)):
        state_dict = from_official_names({k.removeprefix("module."): v for k, v in checkpoint[name].items()})
        _check_shapes(module, state_dict, path, name)
        module.load_state_dict(state_dict)


def save_generator(generator: Generator, folder: str | os.PathLike) -> Path:
    """Export for inference: `generator.safetensors` (weight norm folded) + `config.json`, written atomically."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = _fold_weight_norm_tensors({k: v.detach().cpu().contiguous()
                                            for k, v in generator.state_dict().items()})
    weights_tmp, config_tmp = folder / "generator.safetensors.tmp", folder / "config.json.tmp"
    save_file(state_dict, str(weights_tmp), metadata={"format": "pt", "weight_norm": "folded"})
    config_tmp.write_text(json.dumps(generator.config.to_dict(), indent=2))
    os.replace(weights_tmp, folder / "generator.safetensors")
    os.replace(config_tmp, folder / "config.json")
    return folder / "generator.safetensors"
