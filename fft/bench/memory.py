"""`memory`: parameter + optimizer-state bytes of full fine-tuning, LoRA and QLoRA, from shapes.

    python -m fft.bench memory --preset=1b --lora_rank=8 [--allocate]

Modes, in this order (`MODES`): `full_f32` (every weight trains, f32), `full_bf16_params` (the
same with bf16 storage), `lora` (f32 frozen base + f32 adapters), `qlora_int8` and `qlora_nf4`
(the base's block kernels stored as int8 / 4-bit codes with f32 per-block scales; embeddings,
norms and the LM head stay f32). The TrainState is the one the Trainer assembles
(`fft.train.trainer.prepare`; `jax.eval_shape` of the real init: params, frozen weights,
AdamW state for the trainable part only), so nothing is allocated unless `--allocate` asks
for it (then the process's peak RSS is reported per mode).
"""

from __future__ import annotations

import gc

import jax
from flax import nnx

from fft.bench import common
from fft.bench.common import emit
from fft.train.state import count_model_params

# mode: (lora rank or 0 for full fine-tuning, ModelConfig overrides)
MODES = {
    "full_f32": (0, {}),
    "full_bf16_params": (0, {"param_dtype": "bfloat16"}),
    "lora": (None, {}),
    "qlora_int8": (None, {"quant": "int8"}),
    "qlora_nf4": (None, {"quant": "nf4"}),
}


def _state_bytes(abstract) -> dict:
    params = nnx.filter_state(abstract.params, nnx.Param)
    param_bytes = common.tree_bytes(params) + common.tree_bytes(abstract.frozen)
    return {
        "param_bytes": param_bytes,  # every weight, trainable or frozen (codes and scales)
        "trainable_params_bytes": common.tree_bytes(params),
        "frozen_bytes": common.tree_bytes(abstract.frozen),
        "optimizer_state_bytes": common.tree_bytes(abstract.opt_state),
        "params_plus_optimizer_bytes": param_bytes + common.tree_bytes(abstract.opt_state),
    }


def _quantized_kernel_bytes(abstract) -> int:
    """Bytes of the block kernels' storage (codes + scales, or the kernels themselves)."""
    total = 0
    for part in (abstract.params, abstract.frozen):
        for path, var in nnx.to_flat_state(part):
            if path[0] == "layers" and str(path[-1]).startswith("kernel"):
                total += common.tree_bytes(var.get_value())
    return total


def run_memory(args) -> None:
    base = common.model_config(args.preset)
    optim = common.default_optim()
    out = {}
    for mode, (rank, overrides) in MODES.items():
        rank = args.lora_rank if rank is None else rank
        cfg = base.replace(**overrides)
        build, trainable = common.lm_builder(cfg, lora_rank=rank)
        prep = common.prepare_step(build, None, trainable, optim, 1000)
        abstract = prep.abstract_state
        n_train, _ = common.param_counts(abstract)
        b = _state_bytes(abstract)
        b["block_kernel_bytes"] = _quantized_kernel_bytes(abstract)
        out[mode] = b
        settings = {
            "preset": args.preset,
            "optimizer": "adamw",
            "mode": mode,
            "lora_rank": rank,
            "param_dtype": cfg.param_dtype,
            "quant": cfg.quant,
        }
        n_total = count_model_params(abstract.params) + count_model_params(abstract.frozen)
        emit("params", n_total, "count", trainable=n_train, **settings)
        for key, value in b.items():
            emit(key, value, "bytes", **settings)
        if args.allocate:
            before = common.peak_rss_bytes()
            state = jax.block_until_ready(jax.jit(prep.init_fn)())
            emit("peak_memory_bytes", common.peak_rss_bytes(), "bytes",
                 what="peak host RSS (ru_maxrss) after allocating this state; monotone over the "
                 "process, so modes are in increasing-size order only by chance",
                 peak_rss_before_bytes=before, **settings)  # fmt: skip
            del state
            gc.collect()
    full = out["full_f32"]
    for mode in MODES:
        if mode == "full_f32":
            continue
        emit(
            f"{mode}_vs_full_f32",
            out[mode]["params_plus_optimizer_bytes"] / full["params_plus_optimizer_bytes"],
            "ratio",
            what="params + optimizer state, this mode / full fine-tuning in f32",
            preset=args.preset,
            lora_rank=args.lora_rank,
        )
    emit(
        "lora_vs_full_optimizer_state",
        out["lora"]["optimizer_state_bytes"] / full["optimizer_state_bytes"],
        "ratio",
        target="< 0.05",
        preset=args.preset,
        lora_rank=args.lora_rank,
    )
    for mode in ("qlora_int8", "qlora_nf4"):
        emit(
            f"{mode}_block_kernels_vs_f32",
            out[mode]["block_kernel_bytes"] / out["lora"]["block_kernel_bytes"],
            "ratio",
            what="bytes of the quantized block kernels (codes + f32 scales) / the same kernels "
            "in f32; nf4 is 1/8 plus 32 bits of scale per block",
            target="0.25 + 1/block" if mode == "qlora_int8" else "0.125 + 1/block",
            preset=args.preset,
        )
