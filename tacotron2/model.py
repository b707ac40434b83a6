"""Tacotron2 (Shen et al., 2018), laid out so that its `state_dict` is NVIDIA's.

NVIDIA's published `tacotron2_statedict.pt` is the Tacotron2 most LJSpeech users have; the module
tree below has the attribute names and tensor shapes of NVIDIA/tacotron2 `model.py`, so that file
loads with `load_state_dict(strict=True)`, and the computation is theirs (encoder and post-net are
checked against outputs of NVIDIA's code in tests/test_tacotron2.py). The boxes of the paper's figure 1:

    characters -> Embedding -> Encoder (3 convs + BiLSTM) ---------------------> memory
    previous mel frame -> Prenet -> attention LSTM -> LocationSensitiveAttention(memory) -> context
    [attention LSTM state, context] -> decoder LSTM -> linear projection -> mel frame, stop token
    all mel frames -> Postnet (5 convs) -> residual added to the mel

Only one mel frame per decoder step is supported (as in NVIDIA's code).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tacotron2.text import text_to_sequence
from utils import MelConfig, UserError


@dataclass
class Tacotron2Config:
    """Hyper-parameters of Tacotron2; the defaults are NVIDIA's `hparams.py` (28.2 M parameters)."""

    # Text encoder
    n_symbols: int = 148
    symbols_embedding_dim: int = 512
    encoder_kernel_size: int = 5
    encoder_n_convolutions: int = 3
    encoder_embedding_dim: int = 512
    encoder_dropout: float = 0.5
    # Decoder
    n_mel_channels: int = 80
    n_frames_per_step: int = 1
    decoder_rnn_dim: int = 1024
    prenet_dim: int = 256
    prenet_dropout: float = 0.5
    max_decoder_steps: int = 1000
    gate_threshold: float = 0.5
    p_attention_dropout: float = 0.1
    p_decoder_dropout: float = 0.1
    # Attention
    attention_rnn_dim: int = 1024
    attention_dim: int = 128
    attention_location_n_filters: int = 32
    attention_location_kernel_size: int = 31
    # Post-net
    postnet_embedding_dim: int = 512
    postnet_kernel_size: int = 5
    postnet_n_convolutions: int = 5
    postnet_dropout: float = 0.5
    # Zero the mel (and saturate the gate) past each utterance's end in teacher-forced outputs.
    mask_padding: bool = True

    def __post_init__(self) -> None:
        if self.n_frames_per_step != 1:
            raise UserError(f"n_frames_per_step={self.n_frames_per_step} is not supported: this Tacotron2, "
                            "like NVIDIA's, predicts one mel frame per decoder step")
        if self.encoder_embedding_dim % 2:
            raise UserError(f"encoder_embedding_dim must be even (the BiLSTM gives each direction half), "
                            f"got {self.encoder_embedding_dim}")
        for name in ("encoder_kernel_size", "postnet_kernel_size", "attention_location_kernel_size"):
            if getattr(self, name) % 2 == 0:
                raise UserError(f"{name} must be odd so that 'same' padding keeps the length, "
                                f"got {getattr(self, name)}")
        if self.postnet_n_convolutions < 2:
            raise UserError(f"postnet_n_convolutions must be at least 2, got {self.postnet_n_convolutions}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], strict: bool = True) -> Tacotron2Config:
        """Build from a dict (e.g. `config.json`); unknown keys are an error unless `strict=False`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown and strict:
            raise UserError(f"unknown Tacotron2 config keys: {', '.join(unknown)}")
        return cls(**{k: v for k, v in values.items() if k in names})


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

class XavierLinear(nn.Module):
    """nn.Linear with Xavier-uniform init; the wrapper exists so keys read `...linear_layer.weight` as NVIDIA's."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, w_init_gain: str = "linear") -> None:
        super().__init__()
        self.linear_layer = nn.Linear(in_dim, out_dim, bias=bias)
        nn.init.xavier_uniform_(self.linear_layer.weight, gain=nn.init.calculate_gain(w_init_gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_layer(x)


class XavierConv1d(nn.Module):
    """'Same'-padded nn.Conv1d with Xavier-uniform init; keys read `...conv.weight` as NVIDIA's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 w_init_gain: str = "linear") -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=bias)
        nn.init.xavier_uniform_(self.conv.weight, gain=nn.init.calculate_gain(w_init_gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, w_init_gain: str) -> nn.Sequential:
    # A Sequential so that keys read `convolutions.N.0.conv` (conv) and `convolutions.N.1` (batch norm).
    return nn.Sequential(XavierConv1d(in_channels, out_channels, kernel_size, w_init_gain=w_init_gain),
                         nn.BatchNorm1d(out_channels))


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, max_len] bool, True at positions past each length (the padding)."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


class Encoder(nn.Module):
    """Three 1-d convolutions over the character embeddings, then a bidirectional LSTM."""

    def __init__(self, config: Tacotron2Config) -> None:
        super().__init__()
        dims = [config.symbols_embedding_dim] + [config.encoder_embedding_dim] * config.encoder_n_convolutions
        self.convolutions = nn.ModuleList(
            _conv_bn(dims[i], dims[i + 1], config.encoder_kernel_size, "relu")
            for i in range(config.encoder_n_convolutions))
        self.lstm = nn.LSTM(config.encoder_embedding_dim, config.encoder_embedding_dim // 2,
                            batch_first=True, bidirectional=True)
        self.dropout = config.encoder_dropout

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings [B, C, T] -> memory [B, T, encoder_embedding_dim].

        With `lengths`, the LSTM runs on packed sequences, so padding never reaches the backward
        direction of the real characters; without, the whole [B, T] is treated as real.
        """
        for conv in self.convolutions:
            x = F.dropout(F.relu(conv(x)), self.dropout, self.training)
        x = x.transpose(1, 2)
        if lengths is None:
            return self.lstm(x)[0]
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, _ = self.lstm(packed)
        return nn.utils.rnn.pad_packed_sequence(outputs, batch_first=True, total_length=x.size(1))[0]


class LocationLayer(nn.Module):
    """Features of the previous and cumulative attention weights ("location-sensitive" part)."""

    def __init__(self, n_filters: int, kernel_size: int, attention_dim: int) -> None:
        super().__init__()
        self.location_conv = XavierConv1d(2, n_filters, kernel_size, bias=False)
        self.location_dense = XavierLinear(n_filters, attention_dim, bias=False, w_init_gain="tanh")

    def forward(self, weights_cat: torch.Tensor) -> torch.Tensor:
        # [B, 2, T_in] -> [B, T_in, attention_dim]
        return self.location_dense(self.location_conv(weights_cat).transpose(1, 2))


class LocationSensitiveAttention(nn.Module):
    """Additive attention whose energies also see where it attended so far (Chorowski et al., 2015)."""

    def __init__(self, attention_rnn_dim: int, memory_dim: int, attention_dim: int, n_filters: int,
                 kernel_size: int) -> None:
        super().__init__()
        self.query_layer = XavierLinear(attention_rnn_dim, attention_dim, bias=False, w_init_gain="tanh")
        self.memory_layer = XavierLinear(memory_dim, attention_dim, bias=False, w_init_gain="tanh")
        self.v = XavierLinear(attention_dim, 1, bias=False)
        self.location_layer = LocationLayer(n_filters, kernel_size, attention_dim)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, processed_memory: torch.Tensor,
                weights_cat: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """query [B, attention_rnn_dim], memory [B, T_in, E], processed_memory [B, T_in, A] (the memory
        layer applied once per utterance), weights_cat [B, 2, T_in], mask [B, T_in] True at padding
        -> (context [B, E], weights [B, T_in])."""
        energies = self.v(torch.tanh(self.query_layer(query)[:, None, :] + self.location_layer(weights_cat)
                                     + processed_memory)).squeeze(-1)
        if mask is not None:
            energies = energies.masked_fill(mask, float("-inf"))
        weights = F.softmax(energies, dim=1)
        context = torch.bmm(weights[:, None, :], memory).squeeze(1)
        return context, weights


class Prenet(nn.Module):
    """Two ReLU layers with dropout that is on even at inference: the paper's source of output
    variation, and NVIDIA's checkpoints were trained (and sound right) that way."""

    def __init__(self, in_dim: int, sizes: Sequence[int], dropout: float) -> None:
        super().__init__()
        in_sizes = [in_dim, *sizes[:-1]]
        self.layers = nn.ModuleList(XavierLinear(i, o, bias=False) for i, o in zip(in_sizes, sizes))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear in self.layers:
            x = F.dropout(F.relu(linear(x)), self.dropout, training=True)
        return x


class Postnet(nn.Module):
    """Five 1-d convolutions predicting a residual that refines the decoder's mel."""

    def __init__(self, config: Tacotron2Config) -> None:
        super().__init__()
        n = config.postnet_n_convolutions
        dims = [config.n_mel_channels] + [config.postnet_embedding_dim] * (n - 1) + [config.n_mel_channels]
        self.convolutions = nn.ModuleList(
            _conv_bn(dims[i], dims[i + 1], config.postnet_kernel_size, "tanh" if i < n - 1 else "linear")
            for i in range(n))
        self.dropout = config.postnet_dropout

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mel, T] -> residual [B, n_mel, T] (not yet added to `mel`)."""
        x = mel
        for conv in self.convolutions[:-1]:
            x = F.dropout(torch.tanh(conv(x)), self.dropout, self.training)
        return F.dropout(self.convolutions[-1](x), self.dropout, self.training)


class DecoderState(NamedTuple):
    attention_hidden: torch.Tensor
    attention_cell: torch.Tensor
    decoder_hidden: torch.Tensor
    decoder_cell: torch.Tensor
    attention_weights: torch.Tensor
    attention_weights_cum: torch.Tensor
    attention_context: torch.Tensor


class Decoder(nn.Module):
    """Autoregressive decoder: prenet -> attention LSTM -> attention -> decoder LSTM -> frame + stop token."""

    def __init__(self, config: Tacotron2Config) -> None:
        super().__init__()
        self.config = config
        memory_dim = config.encoder_embedding_dim
        self.prenet = Prenet(config.n_mel_channels, [config.prenet_dim, config.prenet_dim], config.prenet_dropout)
        self.attention_rnn = nn.LSTMCell(config.prenet_dim + memory_dim, config.attention_rnn_dim)
        self.attention_layer = LocationSensitiveAttention(
            config.attention_rnn_dim, memory_dim, config.attention_dim,
            config.attention_location_n_filters, config.attention_location_kernel_size)
        self.decoder_rnn = nn.LSTMCell(config.attention_rnn_dim + memory_dim, config.decoder_rnn_dim)
        self.linear_projection = XavierLinear(config.decoder_rnn_dim + memory_dim, config.n_mel_channels)
        self.gate_layer = XavierLinear(config.decoder_rnn_dim + memory_dim, 1, w_init_gain="sigmoid")

    def initial_state(self, memory: torch.Tensor) -> DecoderState:
        batch, time, memory_dim = memory.shape

        def zeros(*shape: int) -> torch.Tensor:
            return memory.new_zeros(shape)

        return DecoderState(zeros(batch, self.config.attention_rnn_dim), zeros(batch, self.config.attention_rnn_dim),
                            zeros(batch, self.config.decoder_rnn_dim), zeros(batch, self.config.decoder_rnn_dim),
                            zeros(batch, time), zeros(batch, time), zeros(batch, memory_dim))

    def step(self, prenet_output: torch.Tensor, state: DecoderState, memory: torch.Tensor,
             processed_memory: torch.Tensor, mask: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, DecoderState]:
        """One decoder step -> (mel frame [B, n_mel], gate logit [B], new state)."""
        attention_hidden, attention_cell = self.attention_rnn(
            torch.cat((prenet_output, state.attention_context), dim=-1),
            (state.attention_hidden, state.attention_cell))
        # As NVIDIA's: the dropped-out hidden state is also what the next step's LSTM receives (zoneout-like).
        attention_hidden = F.dropout(attention_hidden, self.config.p_attention_dropout, self.training)
        weights_cat = torch.stack((state.attention_weights, state.attention_weights_cum), dim=1)
        context, weights = self.attention_layer(attention_hidden, memory, processed_memory, weights_cat, mask)
        decoder_hidden, decoder_cell = self.decoder_rnn(torch.cat((attention_hidden, context), dim=-1),
                                                        (state.decoder_hidden, state.decoder_cell))
        decoder_hidden = F.dropout(decoder_hidden, self.config.p_decoder_dropout, self.training)
        projection_input = torch.cat((decoder_hidden, context), dim=-1)
        frame = self.linear_projection(projection_input)
        gate = self.gate_layer(projection_input).squeeze(-1)
        new_state = DecoderState(attention_hidden, attention_cell, decoder_hidden, decoder_cell, weights,
                                 state.attention_weights_cum + weights, context)
        return frame, gate, new_state

    def forward(self, memory: torch.Tensor, mel_targets: torch.Tensor, memory_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher forcing: frame t is predicted from target frame t-1 (a zero "go" frame for t=0).

        memory [B, T_in, E], mel_targets [B, n_mel, T_out] -> (mel [B, n_mel, T_out], gate logits
        [B, T_out], alignments [B, T_out, T_in]).
        """
        previous = torch.cat((mel_targets.new_zeros(mel_targets.size(0), mel_targets.size(1), 1),
                              mel_targets[:, :, :-1]), dim=2)
        prenet_outputs = self.prenet(previous.transpose(1, 2))  # all steps at once: inputs are known
        processed_memory = self.attention_layer.memory_layer(memory)
        state = self.initial_state(memory)
        frames, gates, alignments = [], [], []
        for t in range(prenet_outputs.size(1)):
            frame, gate, state = self.step(prenet_outputs[:, t], state, memory, processed_memory, memory_mask)
            frames.append(frame)
            gates.append(gate)
            alignments.append(state.attention_weights)
        return torch.stack(frames, dim=2), torch.stack(gates, dim=1), torch.stack(alignments, dim=1)

    def infer(self, memory: torch.Tensor, max_decoder_steps: int, gate_threshold: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Free running from a go frame until the stop token fires; memory [1, T_in, E].

        Returns (mel [1, n_mel, T_out], gate logits [1, T_out], alignments [1, T_out, T_in],
        whether the stop token fired before `max_decoder_steps`).
        """
        processed_memory = self.attention_layer.memory_layer(memory)
        state = self.initial_state(memory)
        frame = memory.new_zeros(memory.size(0), self.config.n_mel_channels)
        frames, gates, alignments = [], [], []
        stopped = False
        while len(frames) < max_decoder_steps:
            frame, gate, state = self.step(self.prenet(frame), state, memory, processed_memory, None)
            frames.append(frame)
            gates.append(gate)
            alignments.append(state.attention_weights)
            if torch.sigmoid(gate).item() > gate_threshold:
                stopped = True
                break
        return torch.stack(frames, dim=2), torch.stack(gates, dim=1), torch.stack(alignments, dim=1), stopped


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class Tacotron2(nn.Module):
    """Text (symbol ids, see `tacotron2.text`) -> log-mel spectrogram, NVIDIA's parameter layout.

    `mel` is the mel the model was trained on (its frames, scale and level): `MelConfig.nvidia()` for NVIDIA's
    published weights, what train_tacotron2.py used for this repo's; checkpoints store it (tacotron2.checkpoint).
    """

    def __init__(self, config: Tacotron2Config | None = None, mel: MelConfig | None = None) -> None:
        super().__init__()
        self.config = config or Tacotron2Config()
        self.mel = mel or MelConfig()
        c = self.config
        self.embedding = nn.Embedding(c.n_symbols, c.symbols_embedding_dim)
        # NVIDIA's init: uniform with the Xavier bound of an [n_symbols, dim] matrix.
        bound = math.sqrt(3.0) * math.sqrt(2.0 / (c.n_symbols + c.symbols_embedding_dim))
        nn.init.uniform_(self.embedding.weight, -bound, bound)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.postnet = Postnet(c)

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Symbol ids [B, T_in] (+ lengths [B]) -> encoder outputs ("memory") [B, T_in, E]."""
        return self.encoder(self.embedding(tokens).transpose(1, 2), lengths)

    def forward(self, text_padded: torch.Tensor, text_lengths: torch.Tensor, mel_padded: torch.Tensor,
                output_lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced pass for training and for teacher-forced mels.

        Args:
            text_padded: [B, T_in] symbol ids, padded with 0.
            text_lengths: [B] number of real symbols in each row (attention never looks past it).
            mel_padded: [B, n_mel, T_out] target mels; frame t is predicted from frame t-1.
            output_lengths: [B] real frames per row; with `config.mask_padding`, frames past it come
                out as mel 0 and gate logit 1e3 (sigmoid 1 = "stop"), so a loss against zero-padded
                targets and all-ones padded stop targets ignores them.

        Returns:
            mel [B, n_mel, T_out] (decoder), mel_postnet [B, n_mel, T_out] (decoder + post-net residual),
            gate [B, T_out] (stop-token logits), alignments [B, T_out, T_in] (attention weights).
        """
        if mel_padded.dim() != 3 or mel_padded.size(1) != self.config.n_mel_channels:
            raise ValueError(f"mel_padded must be [B, {self.config.n_mel_channels}, T], "
                             f"got {list(mel_padded.shape)}")
        memory = self.encode(text_padded, text_lengths)
        memory_mask = padding_mask(text_lengths.to(memory.device), memory.size(1))
        mel, gate, alignments = self.decoder(memory, mel_padded, memory_mask)
        mel_postnet = mel + self.postnet(mel)
        if self.config.mask_padding and output_lengths is not None:
            frame_mask = padding_mask(output_lengths.to(mel.device), mel.size(2))
            mel = mel.masked_fill(frame_mask[:, None, :], 0.0)
            mel_postnet = mel_postnet.masked_fill(frame_mask[:, None, :], 0.0)
            gate = gate.masked_fill(frame_mask, 1e3)
        return mel, mel_postnet, gate, alignments

    @torch.no_grad()
    def infer(self, tokens: str | torch.Tensor | Sequence[int], max_decoder_steps: int | None = None,
              gate_threshold: float | None = None, cleaners: Sequence[str] = ("english_cleaners",)
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Synthesise one utterance autoregressively (call `.eval()` first, as for any inference).

        Args:
            tokens: the text itself (a `str`, which goes through `text_to_sequence` with `cleaners`, NVIDIA's
                English front end by default), or symbol ids, [T_in] or [1, T_in] (a tensor or a list).
            max_decoder_steps, gate_threshold: override the config's. Decoding stops at the first
                frame whose stop probability exceeds `gate_threshold`; if that never happens it stops
                after `max_decoder_steps` frames with a RuntimeWarning (the audio is then cut off or
                the attention failed).

        Returns:
            mel [1, n_mel, T_out], mel_postnet [1, n_mel, T_out] (what a vocoder takes),
            gate [1, T_out] (logits), alignments [1, T_out, T_in].

        The prenet's dropout stays on, so two calls give slightly different outputs; seed torch for
        repeatability.
        """
        device = self.embedding.weight.device
        if isinstance(tokens, str):
            text, tokens = tokens, text_to_sequence(tokens, cleaners)
            if not tokens:
                raise UserError(f"the text {text!r} has no symbol Tacotron2 knows once cleaned")
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.size(0) != 1 or tokens.size(1) == 0:
            raise ValueError(f"infer takes one non-empty utterance, [T_in] or [1, T_in]; got {list(tokens.shape)}")
        max_steps = self.config.max_decoder_steps if max_decoder_steps is None else max_decoder_steps
        if max_steps < 1:
            raise ValueError(f"max_decoder_steps must be at least 1, got {max_steps}")
        threshold = self.config.gate_threshold if gate_threshold is None else gate_threshold
        memory = self.encode(tokens)
        mel, gate, alignments, stopped = self.decoder.infer(memory, max_steps, threshold)
        if not stopped:
            warnings.warn(f"Tacotron2 reached max_decoder_steps ({max_steps}) before the stop token fired; "
                          "the output is cut off there", RuntimeWarning, stacklevel=2)
        mel_postnet = mel + self.postnet(mel)
        return mel, mel_postnet, gate, alignments

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
