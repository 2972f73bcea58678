"""Instruction tuning (SFT, loss on responses only) of fft:tiny on the synthetic instruction suite.

Run:
  python -m fft.main --config=configs/instruction.py --workdir=runs/instruction
  python -m fft.main --config=configs/instruction.py:lora --workdir=runs/instruction_lora
  python -m fft.main --config=configs/instruction.py:smoke --workdir=/tmp/sft   # < 1 minute
Your own model and data (any local HF decoder directory; JSONL of the chosen format):
  python -m fft.main --config=configs/instruction.py --workdir=runs/mine \
      --config.init_from=/path/to/hf_model --config.data.format=chat \
      --config.data.train=train.jsonl --config.data.eval=test.jsonl
Variants: '' / 'full' (all weights), 'lora' (LoRA r=8 on every linear), 'smoke' (fft:micro,
a few steps; tests and notebooks).
The keys and what each means: `instruction_config` in fft/config_lib.py (the same recipe builds
`fft:tiny-sft`, the SFT start of configs/reward.py, rlhf.py and dpo.py).
"""

from fft import config_lib

# '' is the default (no ':variant' on the command line).
VARIANTS = ("", "full", "lora", "smoke")


def get_config(variant: str = ""):
    """Returns the instruction-tuning config for `variant` ('', 'full', 'lora', 'smoke')."""
    c = config_lib.instruction_config()  # the recipe (fft/config_lib.py): also fft:tiny-sft

    if variant in ("", "full"):
        return c
    if variant == "lora":
        c.lora.rank = 8  # LoRA rank on every linear layer
        c.lora.alpha = 16.0  # scale alpha / rank
        c.optim.lr = 3e-3  # LoRA trains few weights: a higher lr
        return c
    if variant == "smoke":
        return config_lib.instruction_smoke(c)  # fft:micro, 8 steps
    raise config_lib.unknown_variant("configs/instruction.py", variant, VARIANTS)
