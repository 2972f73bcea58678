"""Instruction tuning (SFT): next-token loss on the responses of instruction / chat data.

    python -m fft.main --config=configs/instruction.py --workdir=runs/instruction

The recipe, in the shape of every method (data + loss + evals, then `fft.train.loop.train`):

  data   instruction {instruction, input?, output}, chat {messages}, or prompt_completion
         records: the synthetic suite (`World.instruction_data` / `chat_data`) or the user's
         JSONL (`config.data.train`, `config.data.eval`); encoded by `fft.data.formats` with
         the loss mask on response tokens only (every assistant turn of a chat; everything with
         `data.train_on_prompt`), over-long examples truncated prompt-first or dropped
         (`data.truncation`, both counted in the train metrics), packed by default.
  loss   the pretraining loss with that mask (`fft.train.lm.next_token_loss_fn`): the levanter
         SFT recipe.
  evals  before and after: `exact_match` overall and `exact_match/<task>` by batched greedy
         generation from held-out prompts (`fft.eval.generation`), and `loss` / `ppl` of the
         reference responses given their prompts (`fft.eval.perplexity`).

The base is `config.init_from`: `fft:tiny`, a local HF model directory (its tokenizer and chat
template come with it) or an fft workdir; LoRA with `config.lora.rank > 0`.
"""

from __future__ import annotations

import json
import os

import jax

from fft.config_lib import ConfigError
from fft.data import pipeline, sources
from fft.data.synthetic import World
from fft.eval import generation, perplexity
from fft.train import lm, loop

FORMATS = ("instruction", "chat", "prompt_completion")


# =============================================================================================
# Data: the synthetic suite or the user's files
# =============================================================================================


def _synthetic(config, split: str, n: int) -> list[dict]:
    """`n` synthetic records of `split` in `config.data.format`."""
    c = config.instruction
    world = World(c.world_seed)
    fmt = config.data.format
    if fmt == "chat":
        return world.chat_data(split, n)
    tasks = [t.strip() for t in c.tasks.split(",") if t.strip()] or None
    records = world.instruction_data(split, n, tasks)
    if fmt == "prompt_completion":
        return [
            {"prompt": world.prompt_text(r), "completion": r["output"], "task": r["task"]}
            for r in records
        ]
    return records


def _records(config, spec: str, split: str, n: int):
    """The records of `spec` (a path / glob / tfds spec), or the synthetic suite when empty."""
    if spec:
        return sources.open_source(spec, on_bad_record=config.data.on_bad_record)
    return _synthetic(config, split, n)


def _eval_records(source, n: int) -> list[dict]:
    """The first `n` readable records of a source (bad ones skipped in 'skip' mode)."""
    return sources.read_records(source, limit=n)


def _check(config) -> None:
    if config.data.format not in FORMATS:
        raise ConfigError(
            f"config.data.format={config.data.format!r}: instruction tuning reads {FORMATS}."
        )
    if config.data.truncation not in ("prompt", "drop"):
        raise ConfigError(
            f"config.data.truncation={config.data.truncation!r}: choose 'prompt' or 'drop'."
        )


# =============================================================================================
# Evals
# =============================================================================================


def _sample_writer(config, workdir: str):
    """Writes the first predictions of an eval to samples.jsonl (read by `fft.report`).

    With `eval_every = 0` the loop evaluates exactly before (step 0) and after (the last step);
    the first call of a fresh run is the former.
    """
    path = os.path.join(workdir, "samples.jsonl")
    n = int(config.instruction.samples)

    def write(rows: list[dict]) -> None:
        if not n or config.eval_every or jax.process_index() != 0:
            return
        fresh = not os.path.exists(os.path.join(workdir, "eval_before.json"))
        step = 0 if fresh else int(config.steps)
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w" if fresh else "a") as f:
            for row in rows[:n]:
                f.write(json.dumps({"step": step, **row}) + "\n")

    return write


def make_evaluate(config, workdir: str, tokenizer, eval_records: list[dict]):
    """`evaluate(model) -> {exact_match, exact_match/<task>, loss, ppl}` on held-out records."""
    c, fmt = config.instruction, config.data.format
    template = config.data.template or None
    # Response perplexity: the same encoding as training, loss on the response only.
    encode = pipeline.make_encoder(
        fmt, tokenizer, max_len=config.seq_len, template=template, truncation="prompt"
    )
    ppl_batches = pipeline.make_eval_batches(
        [eval_records],
        encode,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        packing=True,  # segment ids keep examples apart; fewer rows to run
        on_bad_record=config.data.on_bad_record,
    )
    exact = generation.make_exact_match_eval(
        eval_records,
        fmt,
        tokenizer,
        template=template,
        batch_size=c.eval_batch_size,
        max_new_tokens=c.max_new_tokens,
        max_prompt_len=max(config.seq_len - 8, 8),
        on_predictions=_sample_writer(config, workdir),
    )

    def evaluate(model) -> dict[str, float]:
        return {**perplexity.evaluate(model, ppl_batches), **exact(model)}

    return evaluate


# =============================================================================================
# The method
# =============================================================================================


def train_iterator(config, tokenizer, records):
    """Packed (or padded) training Batches of `records`, loss on the responses only.

    Args:
      config: the run config (seq_len, batch_size, seed, data.*).
      tokenizer: the base model's tokenizer.
      records: a random-access source or a list of records in `config.data.format`.

    Returns:
      A `fft.data.pipeline.DataIterator`; its `stats` (truncated, dropped_too_long,
      skipped_records) go into the train metrics.
    """
    encode = pipeline.make_encoder(
        config.data.format,
        tokenizer,
        max_len=config.seq_len,
        template=config.data.template or None,
        train_on_prompt=config.data.train_on_prompt,
        truncation=config.data.truncation,
    )
    # A one-element list: the pipeline reads a list as a mixture of sources.
    return pipeline.make_train_iterator(
        [records],
        encode,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        packing=config.data.packing,
        shuffle=config.data.shuffle,
        seed=config.seed,
        pad_id=max(tokenizer.pad_id, 0),
        on_bad_record=config.data.on_bad_record,
    )


def run(config, workdir: str) -> dict:
    """Instruction-tunes `config.init_from`; returns the results dict (also results.json)."""
    _check(config)
    c = config.instruction
    base = lm.load_base(config)
    train_records = _records(config, config.data.train, "train", c.train_examples)
    train_data = train_iterator(config, base.tokenizer, train_records)
    n_eval = c.eval_examples
    eval_records = _eval_records(_records(config, config.data.eval, "test", n_eval), n_eval)
    if not eval_records:
        raise ConfigError(f"config.data.eval={config.data.eval!r} holds no readable records.")

    return loop.train(
        config,
        workdir,
        method="instruction",
        build_model=lm.model_builder(base.model_config, config),
        loss_fn=lm.next_token_loss_fn(),
        train_data=train_data,
        evaluate=make_evaluate(config, workdir, base.tokenizer, eval_records),
        trainable=lm.trainable_filter(config),
        load_weights=base.load_weights,
        tokenizer=base.tokenizer,
        model_config=base.model_config,
    )
