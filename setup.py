"""`pip install .` is refused on purpose: this repo is a set of scripts run from its own folder, not a package.

Installed, its flat modules (utils, model, train, ...) would land in site-packages under names that clash with
other projects'. Use it as the README says: `make setup` (or `pip install -r requirements.txt`) in a clone, and from
another project load generators with torch.hub (hubconf.py) or from the Hugging Face Hub.
"""

import sys

sys.exit(
    "error: this HiFi-GAN repo is not a pip package and `pip install .` is refused on purpose (its flat modules "
    "utils, model, train, ... would clash with other packages' names in site-packages). Use it from its folder: "
    "`make setup` or `pip install -r requirements.txt`; from another project load a generator with "
    "torch.hub.load('<path or owner/repo>', 'hifigan', checkpoint=...) — see the README, 'Use it from another project'."
)
