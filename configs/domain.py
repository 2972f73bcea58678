"""Domain adaptation: continue training fft:tiny on clinical text, replaying general text.

Run (the README's main job; a few minutes on 2 CPU cores once fft:tiny is built):
  python -m fft.main --config=configs/domain.py --workdir=runs/domain
  python -m fft.main --config=configs/domain.py:lora --workdir=runs/domain_lora
  python -m fft.main --config=configs/domain.py:vocab --workdir=runs/domain_vocab
  python -m fft.main --config=configs/domain.py:smollm2 --workdir=runs/domain_smollm2  # ~30 min
  python -m fft.main --config=configs/domain.py:smoke --workdir=/tmp/domain   # fft:micro, < 1 min
Your own data: --config.data.train=my_domain.jsonl --config.data.eval=my_domain_test.jsonl
({"text": ...} per line); --config.init_from=/path/to/hf_model for a local HF decoder.

Variants: '' / 'full' (all weights; lr 3e-5, 80% general replay: keeps general ability),
'aggressive' (lr 1e-3, 25% replay: learns the domain further, general perplexity +46%),
'lora' (rank-16 adapters), 'vocab' (full + domain tokens
learned with sentencepiece, new embedding rows initialised from their sub-tokens), 'smollm2'
(LoRA on SmolLM2-135M-Instruct; general text = CPython stdlib docstrings, `fft.data.pydocs`),
'smoke'.
Metrics (before / after, results.json): domain_ppl, general_ppl (retention) and tokens_per_doc;
perplexities are per word over whole documents, so runs with different tokenizers compare.
"""

import ml_collections

from fft import config_lib

# '' is the default (no ':variant' on the command line).
VARIANTS = ("", "full", "aggressive", "lora", "vocab", "smollm2", "smoke")


def get_config(variant: str = ""):
    """Returns the domain-adaptation config for `variant` ('', full, aggressive, lora, vocab,
    smoke)."""
    c = config_lib.base_config()
    c.method = "domain"
    c.init_from = "fft:tiny"
    c.steps = 150
    c.batch_size = 8
    c.seq_len = 256
    # Low lr, mostly replay: the domain is learned (token ppl ÷5) while general perplexity moves
    # < 10%; ':aggressive' learns the domain further at a cost in general ability.
    c.optim.lr = 3e-5
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 15
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.checkpoint_every = 50
    c.keep_checkpoints = 1
    c.log_every = 10

    c.domain = ml_collections.ConfigDict()
    c.domain.name = (
        "clinical"  # synthetic domain: legal | clinical | finance (data.train overrides)
    )
    c.domain.world_seed = 0  # seed of the synthetic world (the one fft:tiny was trained on)
    c.domain.train_docs = 3000  # synthetic domain documents for training
    c.domain.eval_docs = 200  # held-out domain and general documents for the evals
    c.domain.general_docs = 5000  # general documents replayed (from the pretraining corpus)
    c.domain.replay = 0.8  # fraction of training records drawn from general text
    # General text when general_train / general_eval are '': synthetic (the world's general
    # corpus) | pydocs (real English: CPython stdlib docstrings, held out by module).
    c.domain.general_source = "synthetic"
    c.domain.general_train = ""  # general replay data spec ('' = synthetic general corpus)
    c.domain.general_eval = ""  # general eval data spec ('' = synthetic held-out general text)
    c.domain.eval_seq_len = 256  # eval row length; only documents that fit whole are scored
    c.domain.vocab = ml_collections.ConfigDict()
    c.domain.vocab.extend = False  # add domain tokens to the tokenizer and the model
    c.domain.vocab.new_tokens = 256  # how many pieces to add
    c.domain.vocab.source = "sentencepiece"  # sentencepiece (learned on the corpus) | terms
    c.domain.vocab.sp_vocab = 2048  # vocabulary of the sentencepiece model learned on the domain

    if variant in ("", "full"):
        return c
    if variant in ("aggressive", "lora", "vocab", "smoke"):
        # The earlier default: more domain, less general ability kept (lora, vocab and smoke
        # start from it, as their recorded results did).
        c.optim.lr = 1e-3
        c.domain.replay = 0.25
    if variant == "aggressive":
        return c
    if variant == "lora":
        c.lora.rank = 16
        c.lora.alpha = 32.0
        c.optim.lr = 3e-3
        c.optim.weight_decay = 0.0
        return c
    if variant == "vocab":
        c.domain.vocab.extend = True
        return c
    if variant == "smollm2":
        # A real pretrained LM (SmolLM2-135M-Instruct, GGUF from the `[models]` extra); general
        # ability is measured on real English text it has not been trained on here.
        c.init_from = "smollm2-135m-instruct"
        c.domain.general_source = "pydocs"  # replay: train-split modules; eval: held-out ones
        c.domain.replay = 0.5  # half the rows are real English: keeps general_ppl from rising
        c.domain.eval_docs = 64  # per eval set: a 135M model scores ~1 row/s on 2 cores
        c.lora.rank = 16  # LoRA rank on every linear layer
        c.lora.alpha = 32.0  # scale alpha / rank = 2
        c.optim.lr = 2e-3  # peak lr of the adapters
        c.optim.weight_decay = 0.0  # adapters start at zero: nothing to decay toward
        c.optim.warmup_steps = 4  # short run: a short warmup
        c.steps = 24  # 32 min on 2 CPU cores at load 9-16 (evals included)
        c.batch_size = 4  # rows per step
        c.seq_len = 256  # tokens per packed row
        c.checkpoint_every = 0  # only the final checkpoint
        c.log_every = 5  # steps between train metric lines
        return c
    if variant == "smoke":
        config_lib.smoke(c, steps=8, batch_size=8)  # 8 rows: 8 test devices
        c.domain.train_docs = 200
        c.domain.general_docs = 200
        c.domain.eval_docs = 24
        c.domain.vocab.extend = True  # exercises the longest path
        c.domain.vocab.new_tokens = 32
        c.domain.vocab.sp_vocab = 600
        c.optim.lr = 3e-3
        return c
    raise config_lib.unknown_variant("configs/domain.py", variant, VARIANTS)
