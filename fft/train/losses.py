"""Loss functions: pure, one formula each.

Mask convention (fft.data.batch): `loss_mask[b, t] = 1` means token `t` is a target, predicted
from the logits at position `t - 1` (so `loss_mask[:, 0]` is ignored). Token losses are a mean
over the target tokens of the whole (global) batch, computed as sum / count, so a sharded
batch gives the same value as one device.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# Positions per chunk of the chunked loss / log-prob helpers: [B, 128, V] f32 logits at a time.
LOGPROB_CHUNK = 128


def _targets(batch):
    """(targets [B,T-1], weights [B,T-1] f32): token t+1 is predicted from position t."""
    tokens = batch["tokens"]
    mask = batch.get("loss_mask")
    if mask is None:
        mask = (batch["segment_ids"] > 0) if "segment_ids" in batch else jnp.ones_like(tokens)
    return tokens[:, 1:], mask[:, 1:].astype(jnp.float32)


def _unembed_fn(unembed):
    """A callable `hidden [B,C,D] -> logits [B,C,V]` from a callable or a `[D, V]` matrix."""
    if callable(unembed):
        return unembed
    w_dv = unembed
    return lambda h: jnp.einsum("bcd,dv->bcv", h, w_dv)


def num_targets(batch) -> jax.Array:
    """Number of target tokens in a batch: sum of loss_mask[:, 1:]."""
    return _targets(batch)[1].sum()


def next_token_loss(logits_btv: jax.Array, batch, *, z_loss_weight: float = 0.0) -> jax.Array:
    """Mean next-token cross-entropy over target tokens.

        loss = sum_{b,t>=1} m[b,t] * (lse(z[b,t-1]) - z[b,t-1,x[b,t]]
                                      + w_z * lse(z[b,t-1])^2) / max(1, sum m[b,t>=1])

    with z = logits (f32), x = tokens, m = loss_mask, lse = logsumexp over the vocab.

    Args:
      logits_btv: [B, T, V] logits at every position.
      batch: dict with `tokens [B,T]` and `loss_mask [B,T]` (or `segment_ids`, all non-padding).
      z_loss_weight: w_z, weight of the PaLM z-loss term (0: off).

    Returns:
      Scalar f32 loss.
    """
    targets, weights = _targets(batch)
    logits = logits_btv[:, :-1].astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    per_token = lse - target_logit + z_loss_weight * lse**2
    return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def chunked_next_token_loss(
    hidden_btd: jax.Array,
    unembed: Callable[[jax.Array], jax.Array] | jax.Array,
    batch,
    *,
    chunk: int = LOGPROB_CHUNK,
    z_loss_weight: float = 0.0,
) -> jax.Array:
    """`next_token_loss(unembed(hidden), batch)` without materialising [B,T,V] logits.

    The sequence is cut into chunks of `chunk` positions; a `lax.scan` computes each chunk's
    logits, logsumexp and target logit, and `jax.checkpoint` makes the backward pass recompute
    a chunk's logits instead of keeping them, so peak memory is [B, chunk, V] rather than
    [B, T, V] (and on CPU it was ~15% faster, BENCHMARKS.md). Same formula as
    `next_token_loss`.

    Args:
      hidden_btd: [B, T, D] final hidden states (after the final norm).
      unembed: `hidden [B,C,D] -> logits [B,C,V]` (e.g. `model.logits`, which applies the
        softcap), or an unembedding matrix `[D, V]`.
      batch: dict with `tokens` and `loss_mask` (see `next_token_loss`).
      chunk: positions per chunk.
      z_loss_weight: weight of the z-loss term.

    Returns:
      Scalar f32 loss, equal to the unchunked loss.
    """
    unembed = _unembed_fn(unembed)
    targets, weights = _targets(batch)
    h = hidden_btd[:, :-1]
    b, t, d = h.shape
    chunk = max(1, min(chunk, t))
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:  # padded positions carry weight 0
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    # [N, B, C, ...]: scan over the chunk axis.
    h = h.reshape(b, n, chunk, d).swapaxes(0, 1)
    targets = targets.reshape(b, n, chunk).swapaxes(0, 1)
    weights = weights.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_loss(h_bcd, tgt_bc, w_bc):
        logits = unembed(h_bcd).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tgt_bc[..., None], axis=-1)[..., 0]
        return ((lse - target_logit + z_loss_weight * lse**2) * w_bc).sum()

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, targets, weights))
    return total / jnp.maximum(weights.sum(), 1.0)


def token_logprobs(logits_btv: jax.Array, tokens_bt: jax.Array) -> jax.Array:
    """Log-probability of each token given the tokens before it.

        out[b, 0] = 0;  out[b, t] = log_softmax(logits[b, t-1])[tokens[b, t]]   (t >= 1)

    Aligned with `loss_mask`: `(out * loss_mask).sum(-1)` is a sequence's target log-likelihood.

    Returns:
      [B, T] f32.
    """
    logp = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(lp, ((0, 0), (1, 0)))


def chunked_token_logprobs(
    hidden_btd: jax.Array,
    unembed: Callable[[jax.Array], jax.Array] | jax.Array,
    tokens_bt: jax.Array,
    *,
    chunk: int = LOGPROB_CHUNK,
    temperature: float | jax.Array = 1.0,
    with_entropy: bool = False,
):
    """`token_logprobs(unembed(hidden) / temperature, tokens)` without materialising [B,T,V].

        z[b, t]      = unembed(hidden[b, t]) / temperature              (f32, [V])
        logp[b, 0]   = 0;  logp[b, t] = z[b, t-1, x[b, t]] - lse(z[b, t-1])         (t >= 1)
        ent[b, 0]    = 0;  ent[b, t]  = lse(z[b, t-1]) - sum_v softmax(z[b, t-1])_v z[b, t-1, v]

    Both are token-aligned like `token_logprobs` (and like `loss_mask`): position t holds the
    distribution that chose token t. As in `chunked_next_token_loss`, a `lax.scan` over chunks
    of `chunk` positions computes each chunk's logits and `jax.checkpoint` recomputes them in
    the backward pass, so peak memory is [B, chunk, V] f32 rather than several [B, T, V] copies.

    Args:
      hidden_btd: [B, T, D] final hidden states (after the final norm).
      unembed: `hidden [B,C,D] -> logits [B,C,V]` (e.g. `model.logits`, which applies the
        softcap, masks padded vocabulary rows and runs a LoRA head), or a `[D, V]` matrix.
        Any slicing of the vocabulary (e.g. scoring with the first K ids only) goes here.
      tokens_bt: [B, T] int token ids.
      chunk: positions per chunk (a chunk that does not divide T - 1 is padded, then dropped).
      temperature: the logits are divided by it (a Python float or a traced scalar).
      with_entropy: also return the entropy of each position's distribution.

    Returns:
      logp `[B, T]` f32, or (logp, entropy) `[B, T]` f32 each with `with_entropy`.
    """
    unembed = _unembed_fn(unembed)
    h = hidden_btd[:, :-1]
    targets = tokens_bt[:, 1:]
    b, t, d = h.shape
    if t == 0:  # one-token rows predict nothing
        zeros = jnp.zeros(tokens_bt.shape, jnp.float32)
        return (zeros, zeros) if with_entropy else zeros
    chunk = max(1, min(chunk, t))
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:  # padded positions are computed on zeros and sliced off below
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [N, B, C, ...]: scan over the chunk axis.
    h = h.reshape(b, n, chunk, d).swapaxes(0, 1)
    targets = targets.reshape(b, n, chunk).swapaxes(0, 1)
    plain_t = isinstance(temperature, int | float) and temperature == 1.0

    @jax.checkpoint
    def chunk_out(h_bcd, tgt_bc):
        logits = unembed(h_bcd).astype(jnp.float32)
        if not plain_t:
            logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, tgt_bc[..., None], axis=-1)[..., 0] - lse
        if not with_entropy:
            return (lp,)
        p = jax.nn.softmax(logits, axis=-1)
        return lp, lse - jnp.sum(p * logits, axis=-1)

    _, ys = jax.lax.scan(lambda c, xs: (c, chunk_out(*xs)), None, (h, targets))

    def token_aligned(y_nbc):  # [N, B, C] -> [B, T]: drop the chunk padding, 0 at t = 0
        y = y_nbc.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
        return jnp.pad(y, ((0, 0), (1, 0)))

    out = tuple(token_aligned(y) for y in ys)
    return out if with_entropy else out[0]


def classification_loss(
    logits_bc: jax.Array, labels_b: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
    """Mean softmax cross-entropy.

        loss = mean_b [ -sum_c q[b,c] * log_softmax(z[b])[c] ],
        q = (1 - eps) * onehot(y[b]) + eps / C

    Args:
      logits_bc: [B, C] class logits.
      labels_b: [B] int class ids.
      label_smoothing: eps.

    Returns:
      Scalar f32 loss.
    """
    logits = logits_bc.astype(jnp.float32)
    n = logits.shape[-1]
    q = jax.nn.one_hot(labels_b, n) * (1.0 - label_smoothing) + label_smoothing / n
    return -(q * jax.nn.log_softmax(logits, axis=-1)).sum(-1).mean()


def multilabel_loss(logits_bc: jax.Array, labels_bc: jax.Array) -> jax.Array:
    """Mean sigmoid binary cross-entropy over examples and labels.

        loss = mean_{b,c} [ softplus(z) - y * z ]   ( = -y log s(z) - (1-y) log(1 - s(z)) )

    Returns:
      Scalar f32 loss.
    """
    z = logits_bc.astype(jnp.float32)
    return (jax.nn.softplus(z) - labels_bc.astype(jnp.float32) * z).mean()


def z_loss(logits_btv: jax.Array, mask_bt: jax.Array | None = None) -> jax.Array:
    """PaLM's auxiliary z-loss: mean of logsumexp(z)^2 over (masked) positions.

        loss = sum_{b,t} m[b,t] * lse(z[b,t])^2 / max(1, sum m)

    Returns:
      Scalar f32 (multiply by a small weight, e.g. 1e-4, before adding).
    """
    lse = jax.nn.logsumexp(logits_btv.astype(jnp.float32), axis=-1)
    if mask_bt is None:
        return (lse**2).mean()
    m = mask_bt.astype(jnp.float32)
    return (lse**2 * m).sum() / jnp.maximum(m.sum(), 1.0)


def kl_divergence(
    p_logits: jax.Array, q_logits: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """KL(p || q) between the categorical distributions of two sets of logits.

        KL = sum_v p_v (log p_v - log q_v),  p = softmax(p_logits), q = softmax(q_logits)
        result = sum_i m_i KL_i / max(1, sum m)   (mean over positions i = leading dims)

    Args:
      p_logits, q_logits: [..., V].
      mask: [...] weights for the positions (None: plain mean).

    Returns:
      Scalar f32.
    """
    logp = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    kl = (jnp.exp(logp) * (logp - logq)).sum(-1)
    if mask is None:
        return kl.mean()
    m = mask.astype(jnp.float32)
    return (kl * m).sum() / jnp.maximum(m.sum(), 1.0)
