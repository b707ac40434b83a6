"""HiFi-GAN under the name this repo's scripts, notebooks and users' code import it by: `model.Generator`,
`model.load_generator`, `model.train_step`, ... are the `hifigan` package's (config, networks, losses and step,
checkpoints). Nothing is defined here: to patch a function, patch it in its own module (`hifigan.losses.mel_loss`).
"""

import hifigan
from hifigan import *  # noqa: F403
from utils import MelConfig, UserError  # noqa: F401 (importable from here before the split too)

__all__ = hifigan.__all__
