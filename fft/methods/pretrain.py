"""Pretraining: next-token loss on the synthetic general corpus (or any text data).

This is how the `fft:<name>` base models are built (`fft.zoo`), and it is also a plain method:
`python -m fft.main --config=configs/pretrain.py --workdir=…`. From scratch it trains a
sentencepiece tokenizer on the corpus first, so the base model and its tokenizer match.
"""

from __future__ import annotations

import os
import tempfile

from fft import config_lib, tokenizers
from fft.data import pipeline, sources
from fft.data.synthetic import World
from fft.eval import perplexity
from fft.train import lm
from fft.train.recipe import Recipe, lm_batch_spec

BASE_MODELS = tuple(config_lib.BASE_MODELS)


def _general_records(world: World, n_docs: int, split: str) -> list[dict]:
    return [{"text": t} for t in world.general_corpus(n_docs, split=split)]


def recipe(config, workdir=None, *, base: lm.Base | None = None) -> Recipe:
    """The pretraining Recipe (from scratch: a sentencepiece tokenizer is trained first).

    Args:
      config: the pretrain config.
      workdir: the run directory: a tokenizer learned from scratch is kept in it, so a resumed
        run uses the same one.
      base: a model to start from instead of `config.init_from` / a scratch preset (fft.compile
        passes an abstract one).
    """
    world = World(config.pretrain.world_seed)
    train_records = (
        sources.open_source(config.data.train, on_bad_record=config.data.on_bad_record)
        if config.data.train
        else _general_records(world, config.pretrain.train_docs, "train")
    )
    eval_records = (
        sources.open_source(config.data.eval, on_bad_record=config.data.on_bad_record)
        if config.data.eval
        else _general_records(world, config.pretrain.eval_docs, "test")
    )
    if base is None and config.init_from:
        base = lm.load_base(config)
    elif base is None:
        base = lm.scratch_base(config, _scratch_tokenizer(config, workdir, train_records))

    def train_data(ctx):
        encode = lm.text_encoder(base.tokenizer, config.seq_len)
        # A one-element list: the pipeline reads a list as a mixture of sources.
        return pipeline.make_train_iterator(
            [train_records],
            encode,
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            packing=config.data.packing,
            shuffle=config.data.shuffle,
            seed=config.seed,
            on_bad_record=config.data.on_bad_record,
            shard_index=ctx.shard.index,
            shard_count=ctx.shard.count,
        )

    def evaluate(ctx):
        del ctx
        eval_batches = pipeline.make_eval_batches(
            [eval_records],
            lm.text_encoder(base.tokenizer, config.seq_len),
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            on_bad_record=config.data.on_bad_record,
        )
        return lambda model: perplexity.evaluate(model, eval_batches)

    return Recipe(
        method="pretrain",
        model=lm.model_spec(base, config),
        loss_fn=lm.next_token_loss_fn(),
        train_data=train_data,
        batch_spec=lm_batch_spec(config.seq_len),
        evaluate=evaluate,
        trainable=lm.trainable_filter(config),
        tokenizer=base.tokenizer,
    )


def _scratch_tokenizer(config, workdir, train_records):
    """The run's sentencepiece tokenizer: read back from `workdir`, else learned from the
    training text (deterministically)."""
    tok_dir = os.path.join(workdir, "tokenizer") if workdir else None
    if tok_dir and os.path.exists(os.path.join(tok_dir, "tokenizer.model")):
        return tokenizers.load_tokenizer(tok_dir)
    # Read the texts here, not inside sentencepiece's callback: a bad record must surface as
    # fft's one-line error, not as a wrapped C++ RuntimeError.
    texts = sources.field_values(train_records, "text", limit=200_000)
    build_dir = os.path.join(workdir, ".tokenizer_build") if workdir else tempfile.mkdtemp()
    return tokenizers.train_sentencepiece(texts, config.pretrain.vocab_size, build_dir)
