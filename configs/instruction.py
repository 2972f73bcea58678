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
"""

import ml_collections

from fft import config_lib


def get_config(variant: str = ""):
    """Returns the instruction-tuning config for `variant` ('', 'full', 'lora', 'smoke')."""
    c = config_lib.base_config()
    c.method = "instruction"  # fft.methods.instruction
    c.init_from = "fft:tiny"  # base model: 'fft:<preset>', a local HF model dir or an fft workdir
    c.steps = 240  # optimizer steps (8 min 40 s alone on 2 CPU cores, evals included)
    c.batch_size = 16  # packed rows per step
    c.seq_len = 256  # tokens per packed row
    c.optim.lr = 1e-3  # peak learning rate (full fine-tune)
    c.optim.warmup_steps = 20  # linear warmup steps
    c.optim.weight_decay = 0.0  # no decay: short runs, few steps
    c.checkpoint_every = 100  # steps between checkpoints
    c.keep_checkpoints = 1  # checkpoints kept in the workdir
    c.log_every = 20  # steps between train metric lines

    c.data.format = "instruction"  # instruction | chat | prompt_completion
    c.data.template = ""  # '' = default Alpaca template / the tokenizer's chat_template
    c.data.train_on_prompt = False  # True: loss on prompt tokens too
    c.data.truncation = "prompt"  # over-long examples: 'prompt' (cut prompt side first) | 'drop'

    c.instruction = ml_collections.ConfigDict()  # method keys: synthetic suite and evals
    c.instruction.world_seed = 0  # seed of the synthetic world (same as the base model's)
    c.instruction.tasks = ""  # comma list of synthetic tasks ('' = all of World.tasks)
    c.instruction.train_examples = 50_000  # synthetic training records (cycled if steps need more)
    c.instruction.eval_examples = 300  # held-out records for exact match and response ppl
    c.instruction.eval_batch_size = 100  # prompts per batched greedy generation call
    c.instruction.max_new_tokens = 0  # answer budget (0 = longest reference + 4 tokens)
    c.instruction.samples = 8  # predictions written to samples.jsonl before and after

    if variant in ("", "full"):
        return c
    if variant == "lora":
        c.lora.rank = 8  # LoRA rank on every linear layer
        c.lora.alpha = 16.0  # scale alpha / rank
        c.optim.lr = 3e-3  # LoRA trains few weights: a higher lr
        return c
    if variant == "smoke":
        config_lib.smoke(c)
        c.steps = 8  # a handful of steps
        c.batch_size = 8  # divides over the 8 fake CPU devices the tests use
        c.seq_len = 256  # the micro tokenizer spells most words out: examples are ~100 tokens
        c.instruction.train_examples = 200  # small synthetic set
        c.instruction.eval_examples = 16  # a few held-out prompts
        c.instruction.eval_batch_size = 16  # one generation call
        c.instruction.max_new_tokens = 16  # short answers: keeps the smoke eval fast
        return c
    raise config_lib.ConfigError(f"configs/instruction.py: unknown variant {variant!r}")
