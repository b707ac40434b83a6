"""The Hugging Face Hub: generator exports published and loaded by repo id, the way vocoders are shared.

An export (`generator.safetensors` + `config.json`, what train.py writes into every checkpoint and the run folder) is
already Hub-shaped. `push` uploads one with a model card; `download` fetches one into the Hub's cache, and
`model.load_generator("hf://owner/name")` (so every `--checkpoint` and `--vocoder` flag) loads it:

    python inference.py --checkpoint work_dir/hifigan --push_to_hub owner/hifigan-lj    # publish
    python inference.py --checkpoint hf://owner/hifigan-lj --input mels/ --output_dir out  # use
    hf://owner/hifigan-lj@v1.0                                                          # a branch, tag or commit

Offline (HF_HUB_OFFLINE=1), a repo already in the cache loads as usual; anything else fails with one line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from utils import UserError

PREFIX = "hf://"
EXPORT_FILES = ("generator.safetensors", "config.json")


def is_hub_id(path: str | os.PathLike) -> bool:
    return str(path).startswith(PREFIX)


def parse_hub_id(spec: str) -> tuple[str, str | None]:
    """'hf://owner/name@revision' -> ('owner/name', 'revision' or None)."""
    repo_id, _, revision = spec.removeprefix(PREFIX).partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"{spec}: a Hub id reads hf://owner/name (optionally @revision)")
    return repo_id, revision or None


def download(spec: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the export of `hf://owner/name[@revision]`, fetched into the Hub cache if not there."""
    repo_id, revision = parse_hub_id(spec)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{spec}: loading from the Hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                        allow_patterns=[*EXPORT_FILES, "README.md"]))
    except Exception as error:  # huggingface_hub raises its own (offline, not found, HTTP, gated, ...)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{spec}: could not get it from the Hugging Face Hub ({type(error).__name__}: {reason}); "
                        "offline, only a repo already in the Hub cache loads — or pass a local export folder") from None
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{spec} has no {' or '.join(missing)}: not a generator export of this repo (push one with "
                        "inference.py --push_to_hub)")
    return folder


def count_parameters(weights: Path) -> int:
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())


def model_card(repo_id: str, config: dict, num_parameters: int) -> str:
    """README.md of a pushed export: Hub metadata, what the generator expects, how to load it."""
    mel = config.get("mel", config)
    rows = [("sampling rate", f"{mel.get('sampling_rate')} Hz"), ("mel bands", mel.get("num_mels")),
            ("FFT / window / hop", f"{mel.get('n_fft')} / {mel.get('window_size')} / {mel.get('hop_size')}"),
            ("mel range", f"{mel.get('fmin')} Hz to {mel.get('fmax') or 'Nyquist'}"),
            ("mel values", "natural log of the Slaney mel magnitude" if mel.get("mel_scale", "log") == "log" else
             f"dB, normalised ({mel.get('mel_scale')})"),
            ("upsampling", " x ".join(str(r) for r in config.get("upsample_rates", []))),
            ("parameters", f"{num_parameters / 1e6:.2f} M (weight norm folded)")]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""---
library_name: pytorch
tags:
- audio
- vocoder
- hifigan
- text-to-speech
---

# HiFi-GAN vocoder `{repo_id}`

A HiFi-GAN generator (Kong et al., 2020): mel spectrogram in, waveform out. `config.json` holds every
hyper-parameter needed to rebuild it and to compute its input mel; `generator.safetensors` the weights.

| | |
| --- | --- |
{table}

Load it with the training repo that wrote it (a clone of it, set up with `make setup`):

```python
from model import load_generator
generator = load_generator("hf://{repo_id}")         # eval mode
audio = generator(mel)                               # [batch, num_mels, frames] -> [batch, 1, frames * hop]
```

or from the command line: `python inference.py --checkpoint hf://{repo_id} --input clip.wav --output_dir out`.
"""


def push(folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
         commit_message: str = "Upload HiFi-GAN generator") -> str:
    """Upload an export folder's generator.safetensors and config.json to `repo_id`, with a model card; the URL."""
    folder = Path(folder)
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder} has no {' or '.join(missing)}: push a run folder or checkpoint_<step> folder "
                        "(train.py writes the export there), not an official or optimiser file")
    parse_hub_id(PREFIX + repo_id)
    from huggingface_hub import HfApi
    config = json.loads((folder / "config.json").read_text())
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        for name in EXPORT_FILES:
            shutil.copy2(folder / name, Path(staging) / name)
        card = model_card(repo_id, config, count_parameters(folder / "generator.safetensors"))
        (Path(staging) / "README.md").write_text(card)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=commit_message)
    return f"https://huggingface.co/{repo_id}"
