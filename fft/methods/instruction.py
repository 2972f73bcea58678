"""Instruction tuning (SFT): next-token loss on the responses of instruction / chat data.

    python -m fft.main --config=configs/instruction.py --workdir=runs/instruction

The recipe, in the shape of every method (data + loss + evals as a `fft.train.recipe.Recipe`):

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
from fft.train import lm
from fft.train.recipe import Recipe, lm_batch_spec

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


def _sample_writer(config, workdir, fresh: bool):
    """Writes the first predictions of an eval to samples.jsonl (read by `fft.report`).

    With `eval_every = 0` the Trainer evaluates exactly before (step 0, on a fresh start) and
    after (the last step).
    """
    n = int(config.instruction.samples)
    calls = [0]

    def write(rows: list[dict]) -> None:
        first = calls[0] == 0 and fresh
        calls[0] += 1
        if not n or not workdir or config.eval_every or jax.process_index() != 0:
            return
        step = 0 if first else int(config.steps)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "samples.jsonl"), "w" if first else "a") as f:
            for row in rows[:n]:
                f.write(json.dumps({"step": step, **row}) + "\n")

    return write


def make_evaluate(config, tokenizer, eval_records: list[dict], on_predictions=None):
    """`evaluate(model) -> {exact_match, exact_match/<task>, loss, ppl}` on held-out records;
    `on_predictions(rows)` sees each eval's predictions."""
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
        on_predictions=on_predictions,
    )

    def evaluate(model) -> dict[str, float]:
        return {**perplexity.evaluate(model, ppl_batches), **exact(model)}

    return evaluate


# =============================================================================================
# The method
# =============================================================================================


def train_iterator(config, tokenizer, records, shard=None):
    """Packed (or padded) training Batches of `records`, loss on the responses only.

    Args:
      config: the run config (seq_len, batch_size, seed, data.*).
      tokenizer: the base model's tokenizer.
      records: a random-access source or a list of records in `config.data.format`.
      shard: this process's DataShard (default: the running process's).

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
        shard_index=shard.index if shard else None,
        shard_count=shard.count if shard else None,
    )


def recipe(config, workdir=None, *, base: lm.Base | None = None) -> Recipe:
    """The instruction-tuning Recipe of `config.init_from` (or `base`)."""
    del workdir
    _check(config)
    c = config.instruction
    base = base or lm.load_base(config)

    def train_data(ctx):
        records = _records(config, config.data.train, "train", c.train_examples)
        return train_iterator(config, base.tokenizer, records, ctx.shard)

    def evaluate(ctx):
        n_eval = c.eval_examples
        eval_records = _eval_records(_records(config, config.data.eval, "test", n_eval), n_eval)
        if not eval_records:
            raise ConfigError(f"config.data.eval={config.data.eval!r} holds no readable records.")
        writer = _sample_writer(config, ctx.workdir, ctx.fresh)
        return make_evaluate(config, base.tokenizer, eval_records, on_predictions=writer)

    return Recipe(
        method="instruction",
        model=lm.model_spec(base, config),
        loss_fn=lm.next_token_loss_fn(),
        train_data=train_data,
        batch_spec=lm_batch_spec(config.seq_len),
        evaluate=evaluate,
        trainable=lm.trainable_filter(config),
        tokenizer=base.tokenizer,
    )
