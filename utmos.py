"""UTMOS22 "strong" naturalness MOS predictor (Saeki et al. 2022) in plain PyTorch, loaded from a local file.

The model is the strong learner of the UTokyo-SaruLab VoiceMOS 2022 system as tarepan/SpeechMOS republished it (the
`utmos22_strong` entry of its torch.hub): a wav2vec 2.0 base encoder, a data-domain and a judge embedding (the
inference rows only), a BLSTM and a frame-wise projection whose mean is the score. SpeechMOS's own code imports
torchaudio; this port needs torch alone and loads the same state dict, key for key.

The weights (`utmos22_strong_step7459_v1.pt`: 102.8 M parameters, ~410 MB in float32) are not fetched here.
Get them once, online, either directly

    https://github.com/tarepan/SpeechMOS/releases/download/v1.0.0/utmos22_strong_step7459_v1.pt

or by running `torch.hub.load("tarepan/SpeechMOS:v1.2.0", "utmos22_strong", trust_repo=True)`, which leaves the file
in `torch.hub.get_dir()/checkpoints/`. Then `score(load_utmos(path), resample(wave, rate))`: SpeechMOS resamples
inside the model with torchaudio's default resampler, and `resample` is that resampler in plain torch (the Kaiser
filter of scipy's resample_poly gives audio 26-46 dB SNR away from it on LJSpeech clips).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError

UTMOS_WEIGHTS = "utmos22_strong_step7459_v1.pt"
UTMOS_URL = f"https://github.com/tarepan/SpeechMOS/releases/download/v1.0.0/{UTMOS_WEIGHTS}"
SAMPLE_RATE = 16000
# The conv feature encoder's receptive field: shorter input yields no frame at all (one frame per 320 samples after).
MIN_SAMPLES = 400

# wav2vec 2.0 base: (channels, kernel, stride) of the 7 feature-encoder convs, then a 12-layer post-LN transformer.
CONV_LAYERS = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
SSL_DIM, FFN_DIM, HEADS, LAYERS = 768, 3072, 12, 12
POS_KERNEL, POS_GROUPS = 128, 16
# UTMOS head: embeddings of the data domain and the judge appended to every frame, then BLSTM and a 2-layer MLP.
EMB_DIM, LSTM_DIM, PROJ_DIM = 128, 512, 2048


def resample(wave: torch.Tensor, orig_freq: int, new_freq: int = SAMPLE_RATE, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """Waveforms (..., T) at `orig_freq` -> (..., ceil(T * new_freq / orig_freq)) at `new_freq`, as
    torchaudio.functional.resample computes them by default (a Hann-windowed sinc): the resampling SpeechMOS's UTMOS22
    applies to its input, so that a score here is the score it gives.

    Output sample j lies at input position t_j = j * orig / new and is sum_n x[n] * h(n - t_j), x zero outside the
    clip, with the low-pass interpolation kernel h(d) = (c / orig) * sinc(c * d / orig) * cos²(π c d / (2 W orig))
    where |c * d / orig| <= W, 0 beyond: cut-off c = rolloff * min(orig, new), W = lowpass_filter_width zero crossings
    on each side. As torchaudio does, one kernel per output phase (new / gcd of the rates) in a strided conv1d.
    """
    if orig_freq == new_freq:
        return wave
    divisor = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // divisor, int(new_freq) // divisor
    cutoff = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / cutoff)  # input samples on each side within W zero crossings
    # kernel[phase, k]: h at distance d = (k - width) - phase * orig / new between input tap and output sample.
    distance = (torch.arange(-width, width + orig, dtype=torch.float64)[None]
                - torch.arange(new, dtype=torch.float64)[:, None] * orig / new)
    x = (distance * cutoff / orig).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(x * math.pi / (2 * lowpass_filter_width)) ** 2  # 0 at the clamp
    kernel = (torch.special.sinc(x) * window * (cutoff / orig)).to(wave.dtype)
    samples = wave.shape[-1]
    flat = F.pad(wave.reshape(-1, 1, samples), (width, width + orig))
    out = F.conv1d(flat, kernel[:, None, :].to(wave.device), stride=orig)  # (batch, phase, block)
    length = math.ceil(new * samples / orig)
    return out.transpose(1, 2).reshape(flat.shape[0], -1)[:, :length].reshape(*wave.shape[:-1], length)


def _conv_block(in_channels: int, out_channels: int, kernel: int, stride: int, group_norm: bool) -> nn.Sequential:
    # Index 1 was a p=0 dropout in fairseq; the Identity keeps the GroupNorm at index 2, where the file has it.
    layers = [nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=False), nn.Identity()]
    if group_norm:  # only the first conv; one group per channel, i.e. each channel normalised over time
        layers.append(nn.GroupNorm(out_channels, out_channels))
    return nn.Sequential(*layers, nn.GELU())


class FeatureEncoder(nn.Module):
    """Raw 16 kHz waveform -> 50 frames/s of 512 features."""

    def __init__(self):
        super().__init__()
        channels = [1] + [out for out, _, _ in CONV_LAYERS]
        self.conv_layers = nn.ModuleList(
            _conv_block(channels[i], out, kernel, stride, group_norm=i == 0)
            for i, (out, kernel, stride) in enumerate(CONV_LAYERS))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, 512, frames)
        x = wave.unsqueeze(1)
        for block in self.conv_layers:
            x = block(x)
        return x


class PositionalConv(nn.Module):
    """wav2vec 2.0's relative position embedding: a wide grouped conv under weight normalisation, then GELU.

    The weight is stored as its direction `weight_v` and per-kernel-tap magnitude `weight_g` (torch's old
    `weight_norm(..., dim=2)`, which named the file's keys); it is recombined on every call, as that hook did.
    """

    def __init__(self):
        super().__init__()
        conv = nn.Conv1d(SSL_DIM, SSL_DIM, POS_KERNEL, groups=POS_GROUPS)
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(conv.weight.detach(), dim=(0, 1), keepdim=True))
        self.weight_v = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, frames) -> (B, C, frames)
        weight = self.weight_v * (self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=(0, 1), keepdim=True))
        # An even kernel padded by half on both sides gives one frame too many: the last one goes.
        x = F.conv1d(x, weight, self.bias, padding=POS_KERNEL // 2, groups=POS_GROUPS)[..., :-1]
        return F.gelu(x)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(SSL_DIM, SSL_DIM), nn.Linear(SSL_DIM, SSL_DIM)
        self.v_proj, self.out_proj = nn.Linear(SSL_DIM, SSL_DIM), nn.Linear(SSL_DIM, SSL_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, frames, C) -> (B, frames, C)
        batch, frames, _ = x.shape
        q, k, v = (proj(x).view(batch, frames, HEADS, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj,
                                                                                      self.v_proj))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(x.transpose(1, 2).reshape(batch, frames, SSL_DIM))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer (wav2vec 2.0 base normalises after each residual, not before)."""

    def __init__(self):
        super().__init__()
        self.self_attn = SelfAttention()
        self.self_attn_layer_norm = nn.LayerNorm(SSL_DIM)
        self.fc1, self.fc2 = nn.Linear(SSL_DIM, FFN_DIM), nn.Linear(FFN_DIM, SSL_DIM)
        self.final_layer_norm = nn.LayerNorm(SSL_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x))
        return self.final_layer_norm(x + self.fc2(F.gelu(self.fc1(x))))


class TransformerEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_conv = nn.Sequential(PositionalConv())
        self.layer_norm = nn.LayerNorm(SSL_DIM)
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, frames, C) -> (B, frames, C)
        x = self.layer_norm(x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2))
        # fairseq pads an odd frame count to even here and masks the pad as a key, then drops it: no real frame ever
        # sees it, so leaving the padding out gives the same output.
        for layer in self.layers:
            x = layer(x)
        return x


class Wav2Vec2(nn.Module):
    """wav2vec 2.0 base (fairseq layout), inference only: no masking, no dropout, last layer's output."""

    def __init__(self):
        super().__init__()
        self.feature_extractor = FeatureEncoder()
        self.layer_norm = nn.LayerNorm(CONV_LAYERS[-1][0])
        self.post_extract_proj = nn.Linear(CONV_LAYERS[-1][0], SSL_DIM)
        self.encoder = TransformerEncoder()
        # Pre-training's mask token: unused at inference, but the file carries it.
        self.mask_emb = nn.Parameter(torch.empty(SSL_DIM).uniform_())

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, frames, 768)
        features = self.layer_norm(self.feature_extractor(wave).transpose(1, 2))
        return self.encoder(self.post_extract_proj(features))


class UTMOS22Strong(nn.Module):
    """16 kHz waveforms (B, T) -> MOS (B,): SSL frames + domain/judge embeddings -> BLSTM -> per-frame score, mean.

    `domain_emb` and `judge_emb` hold one row each: the original's embedding tables at the ids its inference uses
    (domain 0, the VoiceMOS 2022 main track; judge 288, the "mean listener"), picked when SpeechMOS converted them.
    """

    def __init__(self):
        super().__init__()
        self.wav2vec2 = Wav2Vec2()
        self.domain_emb = nn.Parameter(torch.randn(1, EMB_DIM), requires_grad=False)
        self.judge_emb = nn.Parameter(torch.randn(1, EMB_DIM), requires_grad=False)
        self.blstm = nn.LSTM(SSL_DIM + 2 * EMB_DIM, LSTM_DIM, batch_first=True, bidirectional=True)
        self.projection = nn.Sequential(nn.Linear(2 * LSTM_DIM, PROJ_DIM), nn.ReLU(), nn.Linear(PROJ_DIM, 1))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        frames = self.wav2vec2(wave)
        condition = torch.cat([self.domain_emb, self.judge_emb], dim=1)  # (1, 256), the same for every frame
        x = torch.cat([frames, condition.expand(*frames.shape[:2], -1)], dim=2)
        frame_scores = self.projection(self.blstm(x)[0]).squeeze(2)
        # The model was trained on MOS mapped from [1, 5] to [-1, 1]; map back.
        return frame_scores.mean(dim=1) * 2 + 3


def _unwrap(obj: object) -> object:
    """The state dict inside what torch.load returned: the bare dict SpeechMOS publishes, or one under "state_dict"
    or "model" (how training scripts usually save), with a DataParallel "module." prefix dropped."""
    if isinstance(obj, dict) and not all(isinstance(value, torch.Tensor) for value in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if isinstance(obj, dict) and obj and all(isinstance(key, str) and key.startswith("module.") for key in obj):
        obj = {key.removeprefix("module."): value for key, value in obj.items()}
    return obj


def _mismatch(state: dict, expected: dict[str, torch.Tensor]) -> str:
    """What keeps `state` from loading, in one line ("" when it fits)."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [f"{key} {tuple(getattr(state[key], 'shape', ()))} != {tuple(expected[key].shape)}" for key in expected
             if key in state and getattr(state[key], "shape", None) != expected[key].shape]
    problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    return "; ".join(problems)


def load_utmos(path: str | os.PathLike, device: str | torch.device = "cpu") -> UTMOS22Strong:
    """The UTMOS22-strong model, in eval mode, from a local `utmos22_strong_step7459_v1.pt` (see the module doc)."""
    path = Path(path)
    fix = f"download {UTMOS_URL} (or see utmos.py's docstring) and pass that file"
    if not path.is_file():
        raise UserError(f"UTMOS weights {path} do not exist; {fix}")
    try:
        state = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as error:  # not a torch file, truncated, or pickled objects weights_only refuses
        raise UserError(f"UTMOS weights {path} cannot be read ({type(error).__name__}); {fix}") from None
    if not isinstance(state, dict) or not state:
        raise UserError(f"UTMOS weights {path} hold no state dict; {fix}")
    with torch.device("meta"):  # shapes only: a random init of 100M parameters would be thrown away at once
        model = UTMOS22Strong()
    problem = _mismatch(state, model.state_dict())
    if problem:
        raise UserError(f"{path} is not the UTMOS22-strong state dict {UTMOS_WEIGHTS}: {problem}; {fix}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().to(device).eval()


def score(model: UTMOS22Strong, wave_16k: torch.Tensor) -> torch.Tensor:
    """Predicted MOS (about 1..5) of each 16 kHz waveform of a (batch, samples) tensor -> (batch,) float32 on the CPU.

    The waveform goes in as it is (no loudness normalisation, as in the original; the first conv's GroupNorm makes
    the model all but blind to gain). No layer of this port behaves differently in training mode: it has no dropout.
    """
    if wave_16k.dim() != 2:
        raise ValueError(f"expected a (batch, samples) tensor, got shape {tuple(wave_16k.shape)}")
    if wave_16k.shape[1] < MIN_SAMPLES:
        raise ValueError(f"UTMOS needs at least {MIN_SAMPLES} samples ({MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms at "
                         f"16 kHz), got {wave_16k.shape[1]}")
    parameter = next(model.parameters())
    with torch.inference_mode():
        return model(wave_16k.to(parameter.device, parameter.dtype)).float().cpu()
