"""HiFi-GAN weights on disk: the official jik876 checkpoints (their tensor names, their V1/V2/V3 read off the
shapes), this repo's export (safetensors + config.json), and a Hugging Face Hub repo holding one (docs/design.md §3).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import hub
from hifigan.config import HifiGanConfig, resolve_config
from hifigan.model import Generator, MultiPeriodDiscriminator, MultiScaleDiscriminator, fold_weight_norm_tensors
from utils import UserError

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


def _unfold_weight_norm_tensors(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                                 ) -> dict[str, torch.Tensor]:
    """Inverse of fold_weight_norm_tensors for the keys `expected` has: g = ||w|| per output, v = w."""
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
    state_dict = fold_weight_norm_tensors({k: v.detach().cpu().contiguous()
                                            for k, v in generator.state_dict().items()})
    weights_tmp, config_tmp = folder / "generator.safetensors.tmp", folder / "config.json.tmp"
    save_file(state_dict, str(weights_tmp), metadata={"format": "pt", "weight_norm": "folded"})
    config_tmp.write_text(json.dumps(generator.config.to_dict(), indent=2))
    os.replace(weights_tmp, folder / "generator.safetensors")
    os.replace(config_tmp, folder / "config.json")
    return folder / "generator.safetensors"
