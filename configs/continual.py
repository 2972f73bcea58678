"""Continual pre-training of fft:tiny on a stream of fact shards that change by era.

Run:
  python -m fft.main --config=configs/continual.py --workdir=runs/continual
  python -m fft.main --config=configs/continual.py:wsd --workdir=runs/continual_wsd
  python -m fft.main --config=configs/continual.py:smoke --workdir=/tmp/continual   # fft:micro
Your own stream: --config.continual.stream_dir=DIR with shards named era00-00000.jsonl,
era00-00001.jsonl, era01-00000.jsonl ... ({"text": ...} per line); with
--config.continual.stop_at_end=False the loader waits for shards that have not arrived yet.

Variants: '' / 'rewarm' (re-warm + re-decay every era), 'wsd' (one warmup-stable-decay run),
'constant' (constant lr after warmup: the "infinite" schedule), 'noreplay', 'smoke'.
Metrics per era (results.json["eras"]): current_fact_acc, past_fact_acc, new_fact_acc,
general_ppl, fact_loss/era<k>.
"""

import ml_collections

from fft import config_lib

# '' is the default (no ':variant' on the command line).
VARIANTS = ("", "rewarm", "wsd", "constant", "noreplay", "smoke")


def get_config(variant: str = ""):
    """Returns the continual pre-training config for `variant`."""
    c = config_lib.base_config()
    c.method = "continual"
    c.init_from = "fft:tiny"
    c.steps = 400  # total; each era gets steps // continual.eras
    c.batch_size = 8
    c.seq_len = 256
    c.optim.lr = 1e-3
    c.optim.schedule = "rewarm"
    c.optim.warmup_steps = 10  # per era with 'rewarm'
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.checkpoint_every = 50
    c.keep_checkpoints = 1
    c.log_every = 10

    c.continual = ml_collections.ConfigDict()
    c.continual.eras = 4  # eras to train through (the synthetic world has 4)
    c.continual.world_seed = 0  # seed of the synthetic world
    c.continual.docs_per_era = 2000  # fact documents the producer writes per era
    c.continual.shards_per_era = 4  # shards per era (era<kk>-<jjjjj>.jsonl)
    c.continual.replay = 0.1  # fraction of records replayed from earlier eras (era >= 1)
    c.continual.general = 0.1  # fraction of records of general text (forgetting guard)
    c.continual.general_docs = 5000  # general documents in the replay pool
    c.continual.eval_docs = 100  # held-out documents per eval set (general, each era's facts)
    c.continual.stream_dir = ""  # shard directory ('' = WORKDIR/stream, written by the method)
    c.continual.stop_at_end = True  # True: an era's stream ends with its shards; False: wait
    c.continual.poll_interval_s = 1.0  # how often a waiting stream looks for new shards
    c.continual.timeout_s = 0.0  # with stop_at_end=False, give up after this long (0 = never)
    c.continual.fact_eval = "generate"  # generate (greedy exact match) | score (ranked choice)

    if variant in ("", "rewarm"):
        return c
    if variant == "wsd":
        c.optim.schedule = "wsd"
        c.optim.warmup_steps = 20
        return c
    if variant == "constant":
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 20
        return c
    if variant == "noreplay":
        c.continual.replay = 0.0
        c.continual.general = 0.0
        return c
    if variant == "smoke":
        config_lib.smoke(c, steps=8, batch_size=8)  # 8 rows: 8 test devices
        c.checkpoint_every = 2
        c.optim.warmup_steps = 1
        c.continual.eras = 2
        c.continual.docs_per_era = 24
        c.continual.shards_per_era = 2
        c.continual.general_docs = 50
        c.continual.eval_docs = 8
        return c
    raise config_lib.unknown_variant("configs/continual.py", variant, VARIANTS)
