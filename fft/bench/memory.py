"""`memory`: train-state bytes of full fine-tuning versus LoRA, from abstract shapes.

    python -m fft.bench memory --preset=100m --lora_rank=8 [--allocate]

The TrainState is the one fft.train.loop builds (`jax.eval_shape` of the real init: params,
frozen weights, AdamW state for the trainable part only), so nothing of the 100m model is
allocated unless `--allocate` asks for it (then the process's peak RSS is reported per mode).
"""

from __future__ import annotations

import gc

import jax
from flax import nnx

from fft.bench import common
from fft.bench.common import emit


def _state_bytes(abstract) -> dict:
    params = nnx.filter_state(abstract.params, nnx.Param)
    return {
        "trainable_params_bytes": common.tree_bytes(params),
        "frozen_bytes": common.tree_bytes(abstract.frozen),
        "optimizer_state_bytes": common.tree_bytes(abstract.opt_state),
        "total_bytes": common.tree_bytes(abstract),
    }


def run_memory(args) -> None:
    cfg = common.model_config(args.preset)
    settings = {"preset": args.preset, "optimizer": "adamw", "dtype": cfg.param_dtype}
    optim = common.default_optim()
    out = {}
    for mode, rank in (("full", 0), ("lora", args.lora_rank)):
        build, trainable = common.lm_builder(cfg, lora_rank=rank)
        _, abstract, init_state, _, _ = common.train_state_fns(build, trainable, optim, 1000)
        n_train, n_total = common.param_counts(abstract)
        b = _state_bytes(abstract)
        out[mode] = b
        extra = {}
        if args.allocate:
            before = common.peak_rss_bytes()
            state = jax.block_until_ready(jax.jit(init_state)())
            extra = {"peak_rss_bytes": common.peak_rss_bytes(), "peak_rss_before_bytes": before}
            del state
            gc.collect()
        mode_settings = dict(settings, mode=mode, lora_rank=rank)
        emit("params", n_total, "count", trainable=n_train, **mode_settings)
        for key, value in b.items():
            emit(key.removesuffix("_bytes") + "_bytes", value, "bytes", **mode_settings)
        if extra:
            emit("peak_memory_bytes", extra["peak_rss_bytes"], "bytes",
                 what="peak host RSS (ru_maxrss) after allocating this state; monotone over the "
                 "process, so run full first", **mode_settings)  # fmt: skip
    ratio = out["lora"]["optimizer_state_bytes"] / out["full"]["optimizer_state_bytes"]
    emit(
        "lora_vs_full_optimizer_state",
        ratio,
        "ratio",
        target="< 0.05",
        lora_optimizer_state_bytes=out["lora"]["optimizer_state_bytes"],
        full_optimizer_state_bytes=out["full"]["optimizer_state_bytes"],
        lora_rank=args.lora_rank,
        **settings,
    )
    emit(
        "lora_vs_full_train_state",
        out["lora"]["total_bytes"] / out["full"]["total_bytes"],
        "ratio",
        what="whole TrainState (params + frozen + optimizer), LoRA / full",
        lora_rank=args.lora_rank,
        **settings,
    )
