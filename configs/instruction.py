"""Instruction tuning (SFT, loss on responses only) of fft:tiny on the synthetic instruction suite.

Run:
  python -m fft.main --config=configs/instruction.py --workdir=runs/instruction
  python -m fft.main --config=configs/instruction.py:lora --workdir=runs/instruction_lora
  python -m fft.main --config=configs/instruction.py:smollm2 --workdir=runs/instruction_smollm2
  python -m fft.main --config=configs/instruction.py:smoke --workdir=/tmp/sft   # < 1 minute
Your own model and data (any local HF decoder directory; JSONL of the chosen format):
  python -m fft.main --config=configs/instruction.py --workdir=runs/mine \
      --config.init_from=/path/to/hf_model --config.data.format=chat \
      --config.data.train=train.jsonl --config.data.eval=test.jsonl
Variants: '' / 'full' (all weights), 'lora' (LoRA r=8 on every linear), 'smollm2' (LoRA on the
real SmolLM2-135M-Instruct with its ChatML turns; ~30 min on 2 shared CPU cores), 'smoke'
(fft:micro, a few steps; tests and notebooks).
The keys and what each means: `instruction_config` in fft/config_lib.py (the same recipe builds
`fft:tiny-sft`, the SFT start of configs/reward.py, rlhf.py and dpo.py).
"""

from fft import config_lib

# '' is the default (no ':variant' on the command line).
VARIANTS = ("", "full", "lora", "smollm2", "smoke")


def get_config(variant: str = ""):
    """Returns the instruction-tuning config for `variant` ('', 'full', 'lora', 'smollm2',
    'smoke')."""
    c = config_lib.instruction_config()  # the recipe (fft/config_lib.py): also fft:tiny-sft

    if variant in ("", "full"):
        return c
    if variant == "lora":
        c.lora.rank = 8  # LoRA rank on every linear layer
        c.lora.alpha = 16.0  # scale alpha / rank
        c.optim.lr = 3e-3  # LoRA trains few weights: a higher lr
        return c
    if variant == "smollm2":
        return _smollm2(c)
    if variant == "smoke":
        return config_lib.instruction_smoke(c)  # fft:micro, 8 steps
    raise config_lib.unknown_variant("configs/instruction.py", variant, VARIANTS)


# SmolLM2's own ChatML turns (its GGUF's chat template) without the default system turn (20
# tokens of every example on a CPU budget). The tokenizer's bos is `<|im_start|>` and its eos
# `<|im_end|>`, so the template starts after the first and the eos closes the answer. "Input: "
# and "Answer: " put a space before the first word of the input and of the answer, so a word
# copied from the input keeps its tokens (" word", not "word" after a newline; formats.py).
SMOLLM2_TEMPLATE = (
    "user\n{instruction}\nInput: {input}<|im_end|>\n<|im_start|>assistant\nAnswer: {output}"
)


def _smollm2(c):
    """LoRA on SmolLM2-135M-Instruct (GGUF from the `[models]` extra), sized for 2 CPU cores."""
    c.init_from = "smollm2-135m-instruct"  # fft.interop.hub resolves the packaged GGUF
    c.data.template = SMOLLM2_TEMPLATE  # ChatML turns; see SMOLLM2_TEMPLATE
    c.lora.rank = 32  # adapters on every linear layer (q,k,v,o,gate,up,down)
    c.lora.alpha = 32.0  # scale alpha / rank = 1
    c.optim.lr = 4e-3  # peak lr of the adapters (short run: high)
    c.optim.warmup_steps = 6  # linear warmup
    c.steps = 60  # optimizer steps (~15-20 s each on 2 shared cores)
    c.batch_size = 4  # packed rows per step: more, smaller steps learn faster in a short run
    c.seq_len = 128  # an example is ~30-60 tokens: 2-4 per packed row
    c.checkpoint_every = 0  # only the final checkpoint
    c.log_every = 10  # steps between train metric lines
    c.instruction.eval_examples = 300  # 20 held-out prompts per task
    c.instruction.eval_batch_size = 100  # prompts per greedy generation call
    c.instruction.samples = 300  # every eval prediction to samples.jsonl (the failure notes)
    return c
