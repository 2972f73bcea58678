"""LoRA: low-rank adapters on `fft.models.layers.Linear` modules.

`apply_lora` attaches `lora_a [in..., r]` and `lora_b [r, out...]` (type `LoRAParam`, a subclass
of `nnx.Param`) to the Linear layers whose path matches; the layer then computes
`x.W + (x.a).b * scale`. `lora_b` starts at zero, so an adapted model equals its base until
trained. `lora_filter` selects exactly the adapter leaves (the trainable set of a LoRA run);
`merge_lora` folds them into the kernels; `disable_lora` gives the base model (RLHF reference)
from the same weights without a second copy.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fft.config_lib import ConfigError
from fft.models.layers import Linear

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: trainable where the base weights are frozen."""


# An nnx filter selecting the LoRA variables: `nnx.state(model, lora_filter)`.
lora_filter = LoRAParam


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def lora_modules(model: nnx.Module, targets: Sequence[str] | str = DEFAULT_TARGETS):
    """(path, Linear) pairs matching `targets`.

    Args:
      model: any module tree.
      targets: a sequence of layer names matched against the last path element
        (e.g. 'q' matches 'layers.0.attn.q'); 'all' (or 'all-linear'): every Linear except the
        output layer `lm_head`; any other string: a regex searched in the dotted path.

    Returns:
      A list of `(dotted_path, Linear)`.
    """
    out = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, Linear) or not path:
            continue
        p = _path_str(path)
        if targets in ("all", "all-linear"):
            hit = p != "lm_head"
        elif isinstance(targets, str):
            hit = re.search(targets, p) is not None
        else:
            hit = str(path[-1]) in targets
        if hit:
            out.append((p, node))
    return out


def apply_lora(
    model: nnx.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str] | str = DEFAULT_TARGETS,
    *,
    rngs: nnx.Rngs,
    rslora: bool = False,
    dropout: float = 0.0,
) -> nnx.Module:
    """Adds LoRA adapters in place to every matching Linear; returns the model.

    Args:
      model: the module tree (plain or `scan_layers` stacked; stacked kernels get stacked adapters).
      rank: adapter rank r (> 0).
      alpha: scale numerator: scale = alpha / r (or alpha / sqrt(r) with `rslora`).
      targets: layer names or a path regex (see `lora_modules`).
      rngs: for `lora_a`'s init (uniform, bound 1/sqrt(fan_in), as PEFT) and dropout.
      rslora: rank-stabilized scaling.
      dropout: dropout on the adapter input. Off (deterministic) in the built model, so evals,
        generation and rollouts never drop; the train step switches it on with fresh masks per
        step (`dropout_for_step`). Not with stacked layers.

    Returns:
      `model`, changed in place.

    Raises:
      ConfigError: when nothing matches, rank is not positive, or a layer already has LoRA.
    """
    if rank <= 0:
        raise ConfigError(f"lora.rank must be positive to apply LoRA, got {rank}.")
    found = lora_modules(model, targets)
    if not found:
        raise ConfigError(f"lora.targets={targets!r} matched no Linear layer of the model.")
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    for path, lin in found:
        if hasattr(lin, "lora_a"):
            raise ConfigError(f"{path} already has LoRA adapters; merge_lora first.")
        n_in, n_out = len(lin.in_shape), len(lin.out_shape)
        weight = lin.weight_var()  # `kernel`, or its codes `kernel_q` (same rank and names)
        kernel = weight[...]
        lead = kernel.shape[: kernel.ndim - n_in - n_out]  # (L,) for scan-stacked layers
        lead_names = tuple(weight.get_metadata().get("out_sharding") or ())[: len(lead)]
        lead_names = lead_names or (None,) * len(lead)
        names = lin.names
        fan_in = math.prod(lin.in_shape)
        bound = 1.0 / math.sqrt(fan_in)
        # Adapters (and so their Adam moments) are f32 whatever the base's dtype: a bf16 update of
        # a small low-rank factor loses most of its bits.
        a = jax.random.uniform(
            rngs.params(), lead + lin.in_shape + (rank,), jnp.float32, -bound, bound
        )
        lin.lora_a = LoRAParam(a, out_sharding=lead_names + names[:n_in] + (None,))
        b = jnp.zeros(lead + (rank,) + lin.out_shape, jnp.float32)
        lin.lora_b = LoRAParam(b, out_sharding=lead_names + (None,) + names[n_in:])
        lin.lora_scale = float(scale)
        lin.lora_enabled = True
        if dropout > 0:
            if lead:
                raise ConfigError("lora.dropout > 0 is not supported with scan_layers=True.")
            lin.lora_dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)
    return model


def dropout_for_step(model: nnx.Module, rng: jax.Array) -> nnx.Module:
    """Switches on every `nnx.Dropout` of `model` with masks drawn from `rng`, in place.

    Called by the train step on the model it merged for this step's gradient: `rng` is the
    step's key (folded with the step and microbatch), so every step draws fresh masks, while the
    stored model (evals, generation, rollouts) keeps dropout off. No-op without dropout.
    """
    drops = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Dropout)]
    for i, d in enumerate(drops):
        d.deterministic = False
        # A new stream, not a mutated one: the merged model's Variables belong to another trace.
        d.rngs = nnx.RngStream(jax.random.fold_in(rng, i), tag="dropout")
    return model


def _delta(lin: Linear):
    a, b = lin.lora_a[...].astype(jnp.float32), lin.lora_b[...].astype(jnp.float32)
    n_lead = a.ndim - len(lin.in_shape) - 1
    fn = lambda a, b: jnp.tensordot(a, b, axes=1)  # noqa: E731
    for _ in range(n_lead):
        fn = jax.vmap(fn)
    return fn(a, b) * lin.lora_scale


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its kernel (W += a.b * scale) and removes the adapters, in place.

    A quantized kernel (QLoRA) is dequantized first and becomes a full-precision `kernel` Param
    in the model's `param_dtype`: the fold cannot be stored in 4 or 8 bits without losing it.
    """
    for _, lin in lora_modules(model, ".*"):
        if not hasattr(lin, "lora_a"):
            continue
        if lin.quant:
            names = lin.kernel_q.get_metadata().get("out_sharding")
            folded = lin.weight(jnp.float32) + _delta(lin)
            lin.kernel = nnx.Param(folded.astype(lin.param_dtype), out_sharding=names)
            del lin.kernel_q, lin.kernel_scale
            lin.quant = ""
        else:
            w = lin.kernel[...]
            lin.kernel[...] = (w.astype(jnp.float32) + _delta(lin)).astype(w.dtype)
        del lin.lora_a
        del lin.lora_b
        if hasattr(lin, "lora_dropout"):
            del lin.lora_dropout
        lin.lora_scale = 0.0
    return model


@contextlib.contextmanager
def disable_lora(model: nnx.Module) -> Iterator[nnx.Module]:
    """Within the context the model computes without its adapters (the frozen base model).

    Works on a live module, including one merged inside a jitted function:
    `with disable_lora(model): ref_logits = model(tokens)`.
    """
    layers = [lin for _, lin in lora_modules(model, ".*") if hasattr(lin, "lora_a")]
    before = [lin.lora_enabled for lin in layers]
    for lin in layers:
        lin.lora_enabled = False
    try:
        yield model
    finally:
        for lin, flag in zip(layers, before, strict=True):
            lin.lora_enabled = flag


def has_lora(model: nnx.Module) -> bool:
    """Whether any Linear of the model carries adapters."""
    return any(hasattr(lin, "lora_a") for _, lin in lora_modules(model, ".*"))
