"""HiFi-GAN (Kong et al., 2020): the vocoder's config and presets, its networks, losses and training step, and its
checkpoints (the official jik876 files as well as this repo's export).

    from hifigan import build_generator, load_generator
    generator = load_generator("generator_v1")             # official file (preset read off the shapes), an export
    audio = generator(mel)                                   # folder, or hf://owner/name; mel [B, num_mels, frames]
    mel = generator.config.mel.mel(audio_1d)                 # the mel it expects, from float32 audio at its rate

    config.py      HifiGanConfig (the model and its mel; flat config.json), PRESETS, resolve_config
    model.py       Generator (ResBlock1/2, MRF), MultiPeriodDiscriminator, MultiScaleDiscriminator
    losses.py      the LSGAN, feature-matching and mel losses; train_step, step_if_finite
    checkpoint.py  official names <-> this repo's, load_generator, load_discriminators, save_generator
"""

from hifigan.checkpoint import (
    from_official_names,
    guess_official_config,
    load_discriminators,
    load_generator,
    save_generator,
    to_official_names,
)
from hifigan.config import PRESETS, SEGMENT_FRAMES, HifiGanConfig, resolve_config
from hifigan.losses import (
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
    mel_loss,
    step_if_finite,
    train_step,
)
from hifigan.model import (
    LRELU_SLOPE,
    DiscriminatorP,
    DiscriminatorS,
    Generator,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    ResBlock1,
    ResBlock2,
    build_generator,
    channels_last,
    conv,
    conv_fp32,
    full_precision,
    get_padding,
    init_weights,
    to_channels_last,
)

__all__ = [
    "LRELU_SLOPE",
    "PRESETS",
    "SEGMENT_FRAMES",
    "DiscriminatorP",
    "DiscriminatorS",
    "Generator",
    "HifiGanConfig",
    "MultiPeriodDiscriminator",
    "MultiScaleDiscriminator",
    "ResBlock1",
    "ResBlock2",
    "build_generator",
    "channels_last",
    "conv",
    "conv_fp32",
    "discriminator_loss",
    "feature_matching_loss",
    "from_official_names",
    "full_precision",
    "generator_loss",
    "get_padding",
    "guess_official_config",
    "init_weights",
    "load_discriminators",
    "load_generator",
    "mel_loss",
    "resolve_config",
    "save_generator",
    "step_if_finite",
    "to_channels_last",
    "to_official_names",
    "train_step",
]
