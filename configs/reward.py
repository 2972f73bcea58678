"""Reward model from K-way rankings (Plackett-Luce or all-pairs Bradley-Terry) or pairs.

Run:
  python -m fft.main --config=configs/reward.py --workdir=runs/reward    # from fft:tiny-sft
  python -m fft.main --config=configs/reward.py --workdir=runs/reward_mine \
      --config.init_from=runs/instruction   # chain your own SFT run (configs/instruction.py)
  python -m fft.main --config=configs/reward.py:bt --workdir=runs/reward_bt
  python -m fft.main --config=configs/reward.py:smoke --workdir=/tmp/reward   # < 1 minute
Variants: '' (Plackett-Luce over 4-way rankings, LoRA), 'bt' (all implied pairs), 'full'
(all weights), 'smoke'. The workdir then serves as `--config.rlhf.reward=runs/reward`.
"""

import ml_collections

from fft import config_lib

# '' is the default (no ':variant' on the command line).
VARIANTS = ("", "pl", "bt", "full", "smoke")


def get_config(variant: str = ""):
    """Returns the reward-model config for `variant`."""
    c = config_lib.base_config()
    c.method = "reward"
    # Backbone: the SFT model the policy starts from. fft:tiny-sft is fft:tiny tuned by the
    # instruction recipe (built on first use and cached); chain your own SFT run with
    # --config.init_from=<its workdir>.
    c.init_from = "fft:tiny-sft"
    c.steps = 500  # optimizer steps
    c.batch_size = 16  # rankings (or pairs) per step
    c.seq_len = 128  # tokens per candidate (prompt + response)
    c.optim.lr = 1e-4  # LoRA + head lr
    c.optim.warmup_steps = 25  # linear warmup steps
    c.lora.rank = 8  # LoRA backbone; the scalar head always trains
    c.data.format = "ranking"  # with data.train: 'ranking' or 'preference' JSONL
    c.data.packing = False  # one ranking / pair per row (required)
    c.checkpoint_every = 100  # steps between checkpoints
    c.log_every = 10  # steps between metric lines

    r = c.reward = ml_collections.ConfigDict()
    r.loss = "pl"  # rankings: pl (Plackett-Luce) | bt (Bradley-Terry over all implied pairs)
    r.margin = 0.0  # required score gap in the Bradley-Terry loss
    r.centering = 0.01  # weight of mean(score^2), keeps rewards near 0 (Eisenstein et al. 2023)
    r.world_seed = 0  # synthetic world seed (data and judge)
    r.train_records = 8000  # synthetic ranking records
    r.k = 4  # candidates per ranking record
    r.noise = 0.1  # synthetic annotator noise (adjacent flips)
    r.eval_pairs = 256  # held-out noise-free pairs for pairwise accuracy

    if variant in ("", "pl"):
        return c
    if variant == "bt":
        r.loss = "bt"
        return c
    if variant == "full":
        c.lora.rank = 0
        c.optim.lr = 2e-5
        return c
    if variant == "smoke":
        # LoRA r=4 at lr 1e-3; checkpoint only at the end
        config_lib.smoke(c, **config_lib.SMOKE_LORA)
        r.train_records = 64
        r.eval_pairs = 16
        return c
    raise config_lib.unknown_variant("configs/reward.py", variant, VARIANTS)
