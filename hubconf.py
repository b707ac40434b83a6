"""torch.hub entry point: a ready HiFi-GAN generator by name, without installing this repo.

    generator = torch.hub.load("<owner>/<this repo>", "hifigan", checkpoint="hf://owner/hifigan-lj")  # from GitHub
    generator = torch.hub.load("path/to/clone", "hifigan", source="local", checkpoint="generator_v1")
    audio = generator(mel)  # mel [batch, num_mels, frames] -> audio [batch, 1, frames * hop]
    mel = generator.config.mel.mel(audio)  # this repo's mel of a float32 waveform [T] at its recorded level

The repo's modules have plain names (utils, model, hub) that the calling project may use for its own. They are
imported here without clashing with the caller's: the caller's modules of those names are set aside while this
repo's load, then put back, and this repo's are taken out of sys.modules again (they live on in the generator and
`generator.config`). Its requirements (requirements.txt) must be installed in the calling environment.
"""

dependencies = ["torch", "numpy", "librosa", "safetensors"]  # torch.hub checks these are importable first

import contextlib  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

_REPO = Path(__file__).resolve().parent
# This repo's importable names: its modules and packages (a caller's `utils` package clashes as much as a module).
_OWN_NAMES = {path.stem for path in _REPO.glob("*.py")} | {path.parent.name for path in _REPO.glob("*/__init__.py")}


def _is_ours(module) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve().is_relative_to(_REPO)


@contextlib.contextmanager
def _own_modules():
    """While inside: `import model` etc. give this repo's modules. After: sys.modules and sys.path as they were
    (a module of this repo that was already imported, e.g. in this repo's own tests, is used and kept)."""
    clashing = {name: module for name, module in sys.modules.items()
                if name.partition(".")[0] in _OWN_NAMES and not _is_ours(module)}
    before = set(sys.modules)
    for name in clashing:
        del sys.modules[name]
    sys.path.insert(0, str(_REPO))
    try:
        yield
    finally:
        sys.path.remove(str(_REPO))
        for name in set(sys.modules) - before:
            if name.partition(".")[0] in _OWN_NAMES:
                del sys.modules[name]
        sys.modules.update(clashing)


with _own_modules():
    _model = importlib.import_module("model")


def hifigan(checkpoint: str, config: str | None = None, device: str | torch.device = "cpu",
            fold_weight_norm: bool = True) -> torch.nn.Module:
    """A HiFi-GAN generator in eval mode, its `config` attribute holding every mel and model parameter.

    checkpoint: this repo's export (a run or checkpoint_<step> folder with generator.safetensors + config.json), a
    Hugging Face Hub repo holding one ("hf://owner/name[@revision]"), or an official jik876/hifi-gan generator file
    (generator_v1/v2/v3, g_XXXXXXXX, LJ_FT_T2_V*; the preset is read off its tensor shapes). config: a preset
    name or config.json overriding the checkpoint's (official files carry none). fold_weight_norm: fold the weight
    norm into plain weights, for inference (False keeps it, to finetune).

    The generator's input: `generator.config.mel.mel(audio)`, this repo's `utils.mel_spectrogram(audio,
    **generator.config.mel_kwargs())`, of float32 audio at `generator.config.sampling_rate`.
    """
    with _own_modules():  # anything loaded lazily (the Hub client, safetensors) finds this repo's modules too
        generator = _model.load_generator(checkpoint, config, device)
        return generator.folded_copy().to(device) if fold_weight_norm else generator
