"""The train step: `train_step(state, batch) -> (state, metrics)`, pure, jitted once by the loop.

It takes a loss function, never a model class: methods differ by their loss and their
trainable filter only.

    LossFn = (model, batch, rng) -> (loss scalar, aux dict of scalars)

Gradient accumulation contract: a loss that is a mean over a variable number of items (target
tokens, response tokens, valid ranked pairs) returns that number as `aux["loss_weight"]`; the
step weights each microbatch's loss, gradient and aux means by it, so `grad_accum=k` is the same
update as one batch of k times the rows. Counts in `aux` (`loss_weight` and keys ending in
`_tokens` or `_count`) are summed over microbatches, not averaged. A loss without
`loss_weight` is a mean over a fixed number of rows: microbatches weigh the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fft.models import lora as lora_lib
from fft.train.state import TrainState

Batch = dict[str, Any]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, dict]]


def _split_microbatches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...], microbatch i = rows i, i+k, i+2k, ...

    Strided rather than contiguous so that every device keeps its own rows: the batch dim is
    sharded in contiguous blocks, and each block holds rows of every microbatch.
    """

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={k}")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def is_count(key: str) -> bool:
    """Whether an aux metric is a count (summed over microbatches) rather than a mean."""
    return key == "loss_weight" or key.endswith(("_tokens", "_count"))


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    schedule: optax.Schedule | None = None,
):
    """Builds `train_step(state, batch) -> (state, metrics)`.

    Args:
      graphdef: from `split_model`; the step rebuilds the model with
        `nnx.merge(graphdef, state.params, state.frozen)` inside the traced function.
      loss_fn: `(model, batch, rng) -> (loss, aux)`; only `state.params` is differentiated.
      tx: optax transformation over `state.params`.
      grad_accum: microbatches per step, scanned with `lax.scan` (one optimizer update).
      schedule: `step -> lr`, reported as the `lr` metric when given.

    Returns:
      The (unjitted) step; metrics are f32 scalars: `loss`, `grad_norm`, `lr`, and `aux`.
    """

    def loss_and_grad(params, frozen, batch, rng):
        def f(p):
            model = nnx.merge(graphdef, p, frozen)
            # Dropout is on only here, with masks from this step's (and microbatch's) key.
            lora_lib.dropout_for_step(model, jax.random.fold_in(rng, 1 << 20))
            loss, aux = loss_fn(model, batch, rng)
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(params)
        weight = jnp.asarray(aux.get("loss_weight", 1.0), jnp.float32)
        return loss, aux, grads, weight

    def train_step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if grad_accum <= 1:
            loss, aux, grads, _ = loss_and_grad(state.params, state.frozen, batch, rng)
        else:
            micro = _split_microbatches(batch, grad_accum)
            mb0 = jax.tree.map(lambda x: x[0], micro)
            aux_shape = jax.eval_shape(
                lambda: loss_and_grad(state.params, state.frozen, mb0, rng)[1]
            )
            zeros = (
                jax.tree.map(jnp.zeros_like, state.params),
                jnp.zeros((), jnp.float32),
                jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape),
                jnp.zeros((), jnp.float32),
            )

            def body(carry, xs):
                g_sum, l_sum, a_sum, w_sum = carry
                i, mb = xs
                loss, aux, grads, w = loss_and_grad(
                    state.params, state.frozen, mb, jax.random.fold_in(rng, i)
                )
                g_sum = jax.tree.map(lambda s, g: s + w * g, g_sum, grads)
                a_sum = {
                    k: a_sum[k] + (1.0 if is_count(k) else w) * jnp.asarray(v, jnp.float32)
                    for k, v in aux.items()
                }
                return (g_sum, l_sum + w * loss, a_sum, w_sum + w), None

            (g_sum, l_sum, a_sum, w_sum), _ = jax.lax.scan(
                body, zeros, (jnp.arange(grad_accum), micro)
            )
            w_sum = jnp.maximum(w_sum, 1e-12)
            grads = jax.tree.map(lambda g: g / w_sum, g_sum)
            loss = l_sum / w_sum
            aux = {k: v if is_count(k) else v / w_sum for k, v in a_sum.items()}

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
        metrics["loss"] = jnp.asarray(loss, jnp.float32)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, eval_fn: Callable[[nnx.Module, Batch], dict]):
    """Builds `eval_step(state, batch) -> metrics` with `eval_fn(model, batch) -> dict`.

    The model is merged from `state.params` and `state.frozen`; nothing is differentiated.
    """

    def eval_step(state: TrainState, batch: Batch):
        model = nnx.merge(graphdef, state.params, state.frozen)
        return eval_fn(model, batch)

    return eval_step


def merged_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The model with the state's current weights (for evaluation hooks outside jit)."""
    return nnx.merge(graphdef, state.params, state.frozen)
