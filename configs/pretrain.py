"""Pretrain a small decoder on the synthetic world's general corpus (how `fft:tiny` is built).

Run:
  python -m fft.main --config=configs/pretrain.py --workdir=runs/pretrain
  python -m fft.main --config=configs/pretrain.py:smoke --workdir=/tmp/w   # ~1 minute
Variants: '' / 'tiny' (the fft:tiny recipe), 'micro' (the fft:micro recipe), 'smoke'.
"""

from fft import config_lib

# '' is the default (no ':variant' on the command line).
VARIANTS = ("", "tiny", "micro", "smoke")


def get_config(variant: str = ""):
    """Returns the pretraining config for `variant`."""
    if variant in ("", "tiny"):
        return config_lib.pretrain_config("tiny")
    if variant == "micro":
        return config_lib.pretrain_config("micro")
    if variant == "smoke":
        c = config_lib.pretrain_config("micro")
        c.steps = 30
        c.checkpoint_every = 10
        c.log_every = 5
        return c
    raise config_lib.unknown_variant("configs/pretrain.py", variant, VARIANTS)
