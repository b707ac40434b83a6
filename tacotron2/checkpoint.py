"""Loading and saving Tacotron2 weights: NVIDIA's published files and this repo's own.

Two layouts are read, told apart by content:

- **NVIDIA's** (`tacotron2_statedict.pt` and what their `train.py` writes): a torch pickle of
  `{"state_dict": ..., "iteration": int, "learning_rate": float, "optimizer": ...}` with no
  hyper-parameters inside. A `module.` prefix (DataParallel) is stripped; a bare state dict is
  accepted too. With `config=None` the hyper-parameters are read off the tensor shapes.
- **This repo's** (what `save_tacotron2` writes, as for the generator): a `.safetensors` file (the state
  dict, NVIDIA's key names; `tacotron2.safetensors` by default) with `config.json` beside it (the
  `Tacotron2Config` fields, and under "audio" the model's `MelConfig`). The folder or the .safetensors
  file itself may be given.

Either way the loaded model's `mel` says how its training mels were made: NVIDIA's conventions for
NVIDIA's file (`MelConfig.nvidia()`), the stored "audio" for this repo's (with the level and frame
conventions of the time for a checkpoint from before they were stored: 0.95 peak, the vocoder's frames).

Pickles are opened with `torch.load(..., weights_only=True)` only: a file that would run code or
build arbitrary objects on loading is refused with a `UserError`, never executed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tacotron2.model import Tacotron2, Tacotron2Config
from utils import MelConfig, UserError

WEIGHTS_NAME = "tacotron2.safetensors"
CONFIG_NAME = "config.json"

ConfigLike = Tacotron2Config | Mapping[str, Any] | str | os.PathLike | None


def save_tacotron2(model: Tacotron2, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as `tacotron2.safetensors` + `config.json` in the folder `path`; returns the weights file.

    A `path` ending in `.safetensors` names the weights file itself (config.json goes beside it).
    `config.json` holds the hyper-parameters and `model.mel` as "audio"; `extra` (JSON-serialisable, keys
    distinct from the config's) is stored beside them, and may replace "audio".
    Each file is written under a temporary name and renamed, so a crash never leaves half a file.
    """
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path / WEIGHTS_NAME
    weights.parent.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    clashes = sorted(set(config) & set(extra or {}))
    if clashes:
        raise ValueError(f"extra keys clash with Tacotron2Config fields: {', '.join(clashes)}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    config_file = weights.parent / CONFIG_NAME
    tmp = config_file.with_name(CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps({**config, "audio": model.mel.to_dict(), **(extra or {})}, indent=2) + "\n")
    os.replace(tmp, config_file)
    return weights


def load_tacotron2(path: str | os.PathLike, config: ConfigLike = None) -> Tacotron2:
    """A ready `Tacotron2` in eval mode (on the CPU) from either layout described in the module docstring.

    `config`: a `Tacotron2Config`, a dict, or a path to a JSON file. It overrides a stored
    `config.json`; without either, the config is inferred from the tensor shapes (dropouts,
    `max_decoder_steps` and `gate_threshold` then take NVIDIA's defaults). Raises `UserError`
    for a missing, unreadable, unsafe or foreign file, or tensors that do not fit the config.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if path.is_dir() and not weights.is_file():
        raise UserError(f"{path}: a folder without {WEIGHTS_NAME}; expected what save_tacotron2 writes "
                        f"({WEIGHTS_NAME} + {CONFIG_NAME}) or NVIDIA's checkpoint file")
    stored_config, mel = None, MelConfig.nvidia()  # NVIDIA's file stores no mel settings: theirs
    if _looks_like_safetensors(weights):
        state_dict = _read_safetensors(weights)
        config_file = weights.parent / CONFIG_NAME
        if config is None and config_file.is_file():
            stored_config = _resolve_config(config_file)
        mel = _stored_mel(config_file)
    else:
        state_dict = _read_torch_checkpoint(weights)
    resolved = _resolve_config(config) if config is not None else stored_config
    if resolved is None:
        resolved = config_from_state_dict(state_dict, source=weights)
    model = Tacotron2(resolved, mel)
    _load_checked(model, state_dict, weights, explicit=config is not None)
    return model.eval()


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], base: Tacotron2Config | None = None,
                           source: str | os.PathLike = "state dict") -> Tacotron2Config:
    """Read the architecture off NVIDIA-named tensor shapes; other fields come from `base` (or defaults)."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise UserError(f"{source}: not a Tacotron2 state dict: no {key!r} among its {len(state_dict)} "
                            f"tensors (first keys: {_preview(state_dict)})")
        return tuple(state_dict[key].shape)

    def count(prefix: str) -> int:
        pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.0\.conv\.weight")
        return len({m.group(1) for key in state_dict if (m := pattern.fullmatch(key))})

    n_symbols, symbols_embedding_dim = shape("embedding.weight")
    encoder_embedding_dim, _, encoder_kernel_size = shape("encoder.convolutions.0.0.conv.weight")
    prenet_dim, prenet_input_dim = shape("decoder.prenet.layers.0.linear_layer.weight")
    postnet_embedding_dim, n_mel_channels, postnet_kernel_size = shape("postnet.convolutions.0.0.conv.weight")
    n_filters, _, location_kernel_size = shape("decoder.attention_layer.location_layer.location_conv.conv.weight")
    fields = dict(
        n_symbols=n_symbols,
        symbols_embedding_dim=symbols_embedding_dim,
        encoder_kernel_size=encoder_kernel_size,
        encoder_n_convolutions=count("encoder.convolutions"),
        encoder_embedding_dim=encoder_embedding_dim,
        n_mel_channels=n_mel_channels,
        n_frames_per_step=max(1, prenet_input_dim // n_mel_channels),
        decoder_rnn_dim=shape("decoder.decoder_rnn.weight_hh")[1],
        prenet_dim=prenet_dim,
        attention_rnn_dim=shape("decoder.attention_rnn.weight_hh")[1],
        attention_dim=shape("decoder.attention_layer.query_layer.linear_layer.weight")[0],
        attention_location_n_filters=n_filters,
        attention_location_kernel_size=location_kernel_size,
        postnet_embedding_dim=postnet_embedding_dim,
        postnet_kernel_size=postnet_kernel_size,
        postnet_n_convolutions=count("postnet.convolutions"),
    )
    return Tacotron2Config.from_dict({**(base or Tacotron2Config()).to_dict(), **fields})


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _preview(keys: Mapping | list, n: int = 8) -> str:
    keys = [str(k) for k in keys]
    return ", ".join(repr(k) for k in keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _looks_like_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    # safetensors: an 8-byte little-endian header length, then a JSON header; torch files are zips
    # ("PK") or legacy pickles (0x80), so the ninth byte tells them apart.
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from e
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e


def _read_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of non-torch pickles just before refusing them.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if unsafe:
            raise UserError(f"{path}: refused: loading it would import and call {unsafe.group(1)}, i.e. run code "
                            "from the file; only tensors and plain containers are accepted. If you trust the file, "
                            "re-save its state dict with torch.save() in a trusted session") from e
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
        reason = detail.group(1) if detail else (message.splitlines()[0] if message else repr(e))
        raise UserError(f"{path}: not a PyTorch checkpoint that loads without running code ({reason})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first_line = str(e).splitlines()[0] if str(e) else repr(e)
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first_line})") from e

    if not isinstance(obj, Mapping):
        raise UserError(f"{path}: not a Tacotron2 checkpoint: it holds a {type(obj).__name__}, expected NVIDIA's "
                        f"{{'state_dict': ...}} dict or this repo's {WEIGHTS_NAME} + {CONFIG_NAME}")
    if isinstance(obj.get("state_dict"), Mapping):
        state_dict = obj["state_dict"]
    elif any(str(k).removeprefix("module.") == "embedding.weight" for k in obj):
        state_dict = obj  # a bare state dict
    else:
        raise UserError(f"{path}: not a Tacotron2 checkpoint: expected NVIDIA's layout (a dict with 'state_dict') "
                        f"or this repo's ({WEIGHTS_NAME} + {CONFIG_NAME}, written by save_tacotron2); "
                        f"found keys: {_preview(list(obj))}")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{path}: the state dict holds non-tensor entries: {_preview(not_tensors)}")
    if state_dict and all(str(k).startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # saved from DataParallel
    return dict(state_dict)


def _stored_mel(config_file: Path) -> MelConfig:
    """This repo's checkpoint's MelConfig ("audio" in config.json); before the level and frame conventions were
    stored, train_tacotron2.py always used the defaults (0.95 peak, the vocoder's frames)."""
    try:
        audio = json.loads(config_file.read_text()).get("audio") if config_file.is_file() else None
    except (OSError, ValueError, AttributeError) as error:
        raise UserError(f"{config_file}: not a readable config.json ({error})") from None
    return MelConfig.from_dict(audio or {})


def _resolve_config(config: ConfigLike) -> Tacotron2Config | None:
    if config is None or isinstance(config, Tacotron2Config):
        return config
    if isinstance(config, Mapping):
        return Tacotron2Config.from_dict(config, strict=False)
    try:
        values = json.loads(Path(config).read_text())
    except OSError as e:
        raise UserError(f"{config}: cannot read the Tacotron2 config ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{config}: not valid JSON ({e})") from e
    if not isinstance(values, dict):
        raise UserError(f"{config}: expected a JSON object of Tacotron2Config fields")
    # Other keys (the mel parameters save_tacotron2's `extra` stores) are not the model's business.
    return Tacotron2Config.from_dict(values, strict=False)


def _load_checked(model: Tacotron2, state_dict: dict[str, torch.Tensor], source: Path, explicit: bool) -> None:
    expected = model.state_dict()
    against = "the given config" if explicit else "the config read from the file"
    # Files from torch < 0.4.1 lack the batch-norm step counters; they carry no learned information.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = value
    for key, value in expected.items():
        if key in state_dict and state_dict[key].shape != value.shape:
            raise UserError(f"{source}: does not match {against}: {key} has shape {list(state_dict[key].shape)} "
                            f"in the file but {list(value.shape)} in the model")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise UserError(f"{source}: does not match {against}: missing tensors {_preview(missing)}")
    if unexpected:
        raise UserError(f"{source}: does not match {against}: unexpected tensors {_preview(unexpected)}")
    model.load_state_dict(state_dict, strict=True)
