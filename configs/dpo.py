"""DPO / IPO on preference pairs (or every pair of K-way rankings), the cheap path to alignment.

Run:
  python -m fft.main --config=configs/dpo.py --workdir=runs/dpo    # from fft:tiny-sft
  python -m fft.main --config=configs/dpo.py --workdir=runs/dpo_mine \
      --config.init_from=runs/instruction   # chain your own SFT run (configs/instruction.py)
  python -m fft.main --config=configs/dpo.py:ipo --workdir=runs/ipo
  python -m fft.main --config=configs/dpo.py:smoke --workdir=/tmp/dpo      # < 1 minute
Variants: '' (DPO, LoRA), 'ipo', 'rankings' (pairs from 3-way rankings), 'full' (all weights),
'sentiment' (controlled sentiment generation from fft:tiny, as configs/rlhf.py:sentiment),
'smoke'.
"""

import ml_collections

from fft import config_lib

# '' is the default (no ':variant' on the command line).
VARIANTS = ("", "dpo", "ipo", "rankings", "full", "sentiment", "smoke")


def get_config(variant: str = ""):
    """Returns the DPO config for `variant`."""
    c = config_lib.base_config()
    c.method = "dpo"
    # The policy's start: an SFT model. fft:tiny-sft is fft:tiny tuned by the instruction recipe
    # (built on first use and cached, like fft:tiny); chain your own SFT run with
    # --config.init_from=<its workdir>.
    c.init_from = "fft:tiny-sft"
    c.steps = 300  # optimizer steps
    c.batch_size = 32  # preference pairs per step
    c.seq_len = 128  # tokens per side (prompt + response); eval prompts get seq_len - max_new
    c.optim.lr = 5e-5  # LoRA lr; DPO wants small steps
    c.optim.schedule = "warmup_cosine"  # warmup then cosine decay
    c.optim.warmup_steps = 20  # linear warmup steps
    c.lora.rank = 8  # LoRA policy; the reference log-probs are precomputed either way
    c.data.packing = False  # one pair per row (required)
    c.checkpoint_every = 100  # steps between checkpoints
    c.log_every = 10  # steps between metric lines

    d = c.dpo = ml_collections.ConfigDict()
    d.loss = "dpo"  # dpo (sigmoid, Rafailov et al. 2023) | ipo (squared, Azar et al. 2023)
    d.beta = 0.1  # inverse temperature of the implicit reward (IPO: target gap 1/(2 beta))
    d.label_smoothing = 0.0  # cDPO: assumed rate of flipped labels (dpo only)
    d.prompts = "instructions"  # instructions | reviews (sentiment generation): fft.rl.tasks
    d.data = "pairs"  # synthetic data: 'pairs' (judge pairs) | 'rankings' (all pairs of K-way)
    d.train_pairs = 4000  # synthetic records (rankings give up to K(K-1)/2 pairs each)
    d.k = 3  # responses per ranking record ('rankings')
    d.noise = 0.1  # synthetic annotator noise (adjacent flips)
    d.world_seed = 0  # synthetic world seed (data and judge)
    d.eval_prompts = 64  # held-out prompts for true reward / win rate / KL
    d.max_new_tokens = 24  # response length of eval generations

    if variant in ("", "dpo"):
        return c
    if variant == "ipo":
        d.loss = "ipo"
        d.beta = 0.5
        return c
    if variant == "rankings":
        d.data = "rankings"
        return c
    if variant == "full":
        c.lora.rank = 0
        c.optim.lr = 5e-6
        return c
    if variant == "sentiment":
        # Controlled sentiment generation (fft.rl.tasks 'reviews') from the base model itself.
        c.init_from = "fft:tiny"
        c.steps = 200  # 1.6 passes over the 4,000 pairs
        c.optim.lr = 1e-3  # the PPO variant's LoRA lr (5e-5 barely moved in 150 steps)
        c.seq_len = 64  # an opening (~12 tokens) + a synthesised continuation (<= 45 tokens)
        d.prompts = "reviews"
        d.eval_prompts = 128  # held-out openings
        return c
    if variant == "smoke":
        # LoRA r=4 at lr 1e-3; checkpoint only at the end
        config_lib.smoke(c, **config_lib.SMOKE_LORA)
        d.data = "rankings"
        d.train_pairs = 24
        d.eval_prompts = 8
        d.max_new_tokens = 8
        return c
    raise config_lib.unknown_variant("configs/dpo.py", variant, VARIANTS)
