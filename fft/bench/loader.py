"""`loader`: tokenize + pack throughput of the training pipeline versus the train step's appetite.

    python -m fft.bench loader --preset=tiny --seq=256 --batch=8

The loader is `fft.data.pipeline.make_train_iterator` over the synthetic general corpus with a
sentencepiece tokenizer of the preset's vocabulary (as `fft:<name>` is built), packing on; the
consumer is the fft train step of the same preset and batch. The figure that matters is the
ratio: a loader several times faster than the step never leaves the accelerator waiting.
"""

from __future__ import annotations

import time

import numpy as np

from fft.bench import common
from fft.bench.common import emit


def run_loader(args) -> None:
    from fft.data import pipeline
    from fft.data.synthetic import World

    cfg0 = common.model_config(args.preset, args.seq)
    tokenizer = common.synthetic_tokenizer(cfg0.vocab_size, args.tokenizer_docs)
    cfg = cfg0.replace(vocab_size=tokenizer.vocab_size)
    records = [{"text": t} for t in World(0).general_corpus(args.docs)]
    settings = {"preset": args.preset, "seq_len": args.seq, "batch": args.batch,
                "packing": True, "docs": args.docs}  # fmt: skip

    encode = pipeline.make_encoder("text", tokenizer, max_len=args.seq)
    it = pipeline.make_train_iterator(
        [records], encode, seq_len=args.seq, batch_size=args.batch, packing=True, seed=0
    )
    next(it)  # first batch: opens the source, draws the epoch's order
    n_batches, real = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.loader_seconds or n_batches < 2:
        b = next(it)
        n_batches += 1
        real += int((b["segment_ids"] > 0).sum())
    loader_s = time.perf_counter() - t0
    slots = n_batches * args.batch * args.seq
    loader_tps = slots / loader_s
    emit(
        "loader_tokens_per_s",
        loader_tps,
        "tokens/s",
        what="row slots (batch*seq) delivered per second: encode + pack + batch, one process",
        real_tokens_per_s=real / loader_s,
        fill=real / slots,
        batches=n_batches,
        seconds=loader_s,
        **settings,
    )

    trainer = common.lm_trainer(cfg, chunk=args.loss_chunk)
    batch = common.device_batch(next(it))
    trainer.compile(batch)
    trainer.step(batch)
    ts = [trainer.step(batch)[1] for _ in range(args.steps)]
    train_tps = args.batch * args.seq / float(np.median(ts))
    emit("train_tokens_per_s", train_tps, "tokens/s", steps=len(ts), **settings,
         **common.env_note())  # fmt: skip
    emit(
        "loader_vs_train",
        loader_tps / train_tps,
        "ratio",
        target=">= 5",
        loader_tokens_per_s=loader_tps,
        train_tokens_per_s=train_tps,
        **settings,
    )
