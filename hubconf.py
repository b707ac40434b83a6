"""torch.hub entry point: a ready HiFi-GAN generator by name, without installing this repo.

    generator = torch.hub.load("<owner>/<this repo>", "hifigan", checkpoint="hf://owner/hifigan-lj")  # from GitHub
    generator = torch.hub.load("path/to/clone", "hifigan", source="local", checkpoint="generator_v1")
    audio = generator(mel)  # mel [batch, num_mels, frames] -> audio [batch, 1, frames * hop]

torch.hub puts the repo's folder on sys.path, so the repo's own modules load the weights exactly as
inference.py does. Its requirements (requirements.txt) must be installed in the calling environment.
"""

dependencies = ["torch", "numpy", "librosa", "safetensors"]  # torch.hub checks these are importable first

import torch  # noqa: E402

from model import Generator, load_generator  # noqa: E402


def hifigan(checkpoint: str, config: str | None = None, device: str | torch.device = "cpu",
            fold_weight_norm: bool = True) -> Generator:
    """A HiFi-GAN generator in eval mode, its `config` attribute holding every mel and model parameter.

    checkpoint: this repo's export (a run or checkpoint_<step> folder with generator.safetensors + config.json), a
    Hugging Face Hub repo holding one ("hf://owner/name[@revision]"), or an official jik876/hifi-gan generator file
    (generator_v1/v2/v3, g_XXXXXXXX, LJ_FT_T2_V*; the preset is read off its tensor shapes). config: a preset
    name or config.json overriding the checkpoint's (official files carry none). fold_weight_norm: fold the weight
    norm into plain weights, for inference (False keeps it, to finetune).
    """
    generator = load_generator(checkpoint, config, device)
    return generator.folded_copy().to(device) if fold_weight_norm else generator
