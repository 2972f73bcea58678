"""Perplexity of a causal LM over a finite list of batches (target tokens only)."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from fft import sharding
from fft.train import losses


@nnx.jit
def _sums(model, batch):
    """(sum of target NLL, number of targets) for one batch."""
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    logp = losses.chunked_token_logprobs(hidden, model.logits, batch["tokens"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return -(logp * mask).sum(), mask.sum()


def evaluate(model, batches, prefix: str = "") -> dict[str, float]:
    """Mean next-token loss and perplexity over `batches`.

    Args:
      model: a decoder with `hidden_states` and `logits`.
      batches: a list of Batch dicts (fields tokens, positions, segment_ids, loss_mask).
      prefix: prepended to the metric names ('domain_' -> 'domain_loss', 'domain_ppl').

    Returns:
      {'<prefix>loss': mean NLL per target token, '<prefix>ppl': exp of it}.
    """
    total, count = 0.0, 0.0
    for batch in batches:
        # Every process holds the same batches (make_eval_batches): placed like the model, the
        # sums are global and the same on every process.
        nll, n = sharding.to_host(_sums(model, sharding.put_like(batch, nnx.state(model))))
        total, count = total + float(nll), count + float(n)
    loss = total / max(count, 1.0)
    return {f"{prefix}loss": loss, f"{prefix}ppl": math.exp(min(loss, 50.0))}
