"""Pretraining: next-token loss on the synthetic general corpus (or any text data).

This is how the `fft:<name>` base models are built (`build`), and it is also a plain method:
`python -m fft.main --config=configs/pretrain.py --workdir=…`. From scratch it trains a
sentencepiece tokenizer on the corpus first, so the base model and its tokenizer match.
"""

from __future__ import annotations

import os

from fft import config_lib, tokenizers
from fft.data import pipeline, sources
from fft.data.synthetic import World
from fft.eval import perplexity
from fft.train import lm, loop

BASE_MODELS = tuple(config_lib.BASE_MODELS)


def _general_records(world: World, n_docs: int, split: str) -> list[dict]:
    return [{"text": t} for t in world.general_corpus(n_docs, split=split)]


def run(config, workdir: str) -> dict:
    """Pretrains (or continues pretraining) a decoder; returns the results dict."""
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

    if config.init_from:
        base = lm.load_base(config)
    else:
        # From scratch: the tokenizer is learned from the training text (deterministically),
        # then the model preset is sized to it.
        tok_dir = os.path.join(workdir, "tokenizer")
        if os.path.exists(os.path.join(tok_dir, "tokenizer.model")):
            tokenizer = tokenizers.load_tokenizer(tok_dir)
        else:
            # Read the texts here, not inside sentencepiece's callback: a bad record must
            # surface as fft's one-line error, not as a wrapped C++ RuntimeError.
            texts = sources.field_values(train_records, "text", limit=200_000)
            tokenizer = tokenizers.train_sentencepiece(
                texts, config.pretrain.vocab_size, os.path.join(workdir, ".tokenizer_build")
            )
        base = lm.scratch_base(config, tokenizer)

    encode = lm.text_encoder(base.tokenizer, config.seq_len)
    # A one-element list: the pipeline reads a list as a mixture of sources.
    train_data = pipeline.make_train_iterator(
        [train_records],
        encode,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        packing=config.data.packing,
        shuffle=config.data.shuffle,
        seed=config.seed,
        on_bad_record=config.data.on_bad_record,
    )
    eval_batches = pipeline.make_eval_batches(
        [eval_records],
        encode,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        on_bad_record=config.data.on_bad_record,
    )

    def evaluate(model) -> dict:
        return perplexity.evaluate(model, eval_batches)

    return loop.train(
        config,
        workdir,
        method="pretrain",
        build_model=lm.model_builder(base.model_config, config),
        loss_fn=lm.next_token_loss_fn(),
        train_data=train_data,
        evaluate=evaluate,
        trainable=lm.trainable_filter(config),
        load_weights=base.load_weights,
        tokenizer=base.tokenizer,
        model_config=base.model_config,
    )


def build(name: str, workdir: str) -> dict:
    """Builds base model `fft:<name>` into `workdir` (called by fft.zoo on first use)."""
    config = config_lib.pretrain_config(name)
    return run(config, workdir)
