"""Heads on top of a backbone's hidden states: classification/regression, value, scalar reward.

Heads compute in float32 and return float32. Whether a classification is single-label (softmax)
or multi-label (sigmoid) is the loss's choice; the head only produces `n_out` scores.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fft.models.layers import Linear


def _mask_of(hidden_btd, segment_ids_or_mask):
    b, t = hidden_btd.shape[:2]
    if segment_ids_or_mask is None:
        return jnp.ones((b, t), bool)
    return segment_ids_or_mask > 0


def first_index(mask_bt):
    """Index of the first real token per row (0 for an all-padding row)."""
    return jnp.argmax(mask_bt, axis=1)


def last_index(mask_bt):
    """Index of the last real token per row (works for left and right padding)."""
    t = mask_bt.shape[1]
    return t - 1 - jnp.argmax(mask_bt[:, ::-1], axis=1)


def pool(hidden_btd, mask_bt, pooling: str):
    """Pools hidden states `[B,T,D]` to `[B,D]` float32: 'cls' (first real), 'last', 'mean'."""
    h = hidden_btd.astype(jnp.float32)
    if pooling == "mean":
        m = mask_bt.astype(jnp.float32)[:, :, None]
        return (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    if pooling == "cls":
        idx = first_index(mask_bt)
    elif pooling == "last":
        idx = last_index(mask_bt)
    else:
        raise ValueError(f"pooling must be 'cls', 'mean' or 'last', got {pooling!r}")
    return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]


class ClassificationHead(nnx.Module):
    """Pooled hidden state -> `n_out` scores (classes, labels or regression targets)."""

    def __init__(self, d_model: int, n_out: int, pooling: str = "cls", *, rngs: nnx.Rngs):
        if pooling not in ("cls", "mean", "last"):
            raise ValueError(f"pooling must be 'cls', 'mean' or 'last', got {pooling!r}")
        self.pooling = pooling
        self.out = Linear((d_model,), (n_out,), names=("embed", None), use_bias=True, rngs=rngs)

    def __call__(self, hidden_btd, segment_ids_or_mask=None):
        """Args: hidden `[B,T,D]`, segment ids or mask `[B,T]` (>0 = real). Returns `[B,n_out]`."""
        pooled = pool(hidden_btd, _mask_of(hidden_btd, segment_ids_or_mask), self.pooling)
        return self.out(pooled).astype(jnp.float32)


class ValueHead(nnx.Module):
    """Per-token scalar (PPO value): `[B,T,D] -> [B,T]`, zero-initialized output."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs):
        self.out = Linear(
            (d_model,), (1,), names=("embed", None), use_bias=True, init_std=0.0, rngs=rngs
        )

    def __call__(self, hidden_btd, segment_ids_or_mask=None):
        return self.out(hidden_btd.astype(jnp.float32))[..., 0].astype(jnp.float32)


class ScalarHead(nnx.Module):
    """One scalar per sequence at its last real token (reward model): `[B,T,D] -> [B]`."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs):
        self.out = Linear((d_model,), (1,), names=("embed", None), use_bias=True, rngs=rngs)

    def __call__(self, hidden_btd, segment_ids_or_mask=None):
        pooled = pool(hidden_btd, _mask_of(hidden_btd, segment_ids_or_mask), "last")
        return self.out(pooled)[:, 0].astype(jnp.float32)


class SequenceClassifier(nnx.Module):
    """A backbone (decoder with `hidden_states`, or an encoder returning hidden states) + a head.

    Param paths: `backbone.*` and `head.*` (for freezing / discriminative learning rates).
    """

    def __init__(self, backbone: nnx.Module, head: nnx.Module):
        self.backbone = backbone
        self.head = head

    def __call__(self, tokens, positions=None, segment_ids=None):
        """Returns the head's output for `tokens [B,T]` (segment 0 = padding)."""
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if hasattr(self.backbone, "hidden_states"):
            hidden = self.backbone.hidden_states(tokens, positions, segment_ids)
        else:  # encoders: __call__(tokens, token_types=None, attention_mask=None) -> hidden
            hidden = self.backbone(tokens, attention_mask=segment_ids > 0)
        return self.head(hidden, segment_ids)
