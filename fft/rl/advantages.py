"""Advantages and returns for policy-gradient RL on token sequences — pure, one formula each.

Shapes: `[B, N]` over the N response tokens of B sequences. `mask_bn` is 1 on real response
tokens and 0 after the sequence ended (right padding); every function treats masked positions as
"after the episode": they contribute nothing and nothing flows back through them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def masked_sum(x, mask, axis=None):
    """sum(x * mask) over `axis`."""
    return jnp.sum(x * mask, axis=axis)


def masked_mean(x, mask, axis=None):
    """sum(x * mask) / max(sum(mask), 1) over `axis` (0 when the mask is empty)."""
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x, mask, *, unbiased: bool = True):
    """Variance of the masked entries: sum(m (x - mean)^2) / (n - 1) (n when not `unbiased`)."""
    mean = masked_mean(x, mask)
    n = jnp.sum(mask)
    sq = jnp.sum(jnp.square(x - mean) * mask)
    denom = jnp.maximum(n - 1.0, 1.0) if unbiased else jnp.maximum(n, 1.0)
    return sq / denom


def whiten(x_bn, mask_bn, *, shift_mean: bool = True, eps: float = 1e-8):
    """Normalises masked entries to unit variance (and zero mean when `shift_mean`).

        y = (x - mean) / sqrt(var + eps)       mean, var over entries with mask = 1
        y = x / sqrt(var + eps) + mean          when not shift_mean (keeps the sign of the mean)

    Masked-out entries come back as 0.

    Args:
      x_bn: values to whiten (advantages).
      mask_bn: 1 on real tokens.
      shift_mean: subtract the mean (advantages) or keep it (rewards, as in TRL).
      eps: variance floor.

    Returns:
      Whitened array, same shape.
    """
    mask_bn = mask_bn.astype(x_bn.dtype)
    mean = masked_mean(x_bn, mask_bn)
    var = masked_var(x_bn, mask_bn)
    y = (x_bn - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return y * mask_bn


def gae(rewards_bn, values_bn, mask_bn, *, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded sequences.

    With m_t the mask and V_{N} = 0 (the episode ends at the last real token):

        delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
        R_t     = A_t + V_t                       (the value target, "returns")

    A and R are 0 where m_t = 0.

    Args:
      rewards_bn: per-token rewards (score at the last token, minus the KL penalty at every token).
      values_bn: value-head predictions V_t, read at the position whose logits sample token t
        (the state before token t is emitted).
      mask_bn: 1 on real response tokens.
      gamma: discount.
      lam: GAE lambda (1 = Monte-Carlo returns minus V, 0 = one-step TD).

    Returns:
      (advantages_bn, returns_bn).
    """
    mask_bn = mask_bn.astype(rewards_bn.dtype)
    rewards_bn = rewards_bn * mask_bn
    values_bn = values_bn * mask_bn
    # Next-step value and mask; past the end both are 0.
    next_values = jnp.pad(values_bn[:, 1:], ((0, 0), (0, 1)))
    next_mask = jnp.pad(mask_bn[:, 1:], ((0, 0), (0, 1)))
    deltas = rewards_bn + gamma * next_mask * next_values - values_bn

    def step(carry_b, xs):
        delta_b, nmask_b = xs
        adv_b = delta_b + gamma * lam * nmask_b * carry_b
        return adv_b, adv_b

    # Scan backwards over time: time-major inputs, reversed.
    _, adv_nb = jax.lax.scan(
        step, jnp.zeros_like(deltas[:, 0]), (deltas.T, next_mask.T), reverse=True
    )
    advantages = adv_nb.T * mask_bn
    returns = (advantages + values_bn) * mask_bn
    return advantages, returns


def discounted_returns(rewards_bn, mask_bn, *, gamma: float = 1.0):
    """Reward-to-go: G_t = r_t + gamma * m_{t+1} * G_{t+1}; 0 where m_t = 0.

    Args:
      rewards_bn: per-token rewards.
      mask_bn: 1 on real tokens.
      gamma: discount.

    Returns:
      returns_bn.
    """
    zeros = jnp.zeros_like(rewards_bn)
    # GAE with V = 0 and lambda = 1 is exactly the discounted reward-to-go.
    _, returns = gae(rewards_bn, zeros, mask_bn, gamma=gamma, lam=1.0)
    return returns


def group_relative(scores_b, group_size: int, *, normalize: bool = True, eps: float = 1e-6):
    """GRPO advantages (Shao et al. 2024): each sample's score against its prompt's group.

    Rows are grouped consecutively, G = group_size samples per prompt:

        A_i = (s_i - mean_g(s)) / (std_g(s) + eps)     (normalize)
        A_i =  s_i - mean_g(s)                          (not normalize; Dr. GRPO)

    std is the population standard deviation of the group.

    Args:
      scores_b: [B] sequence scores, B = n_prompts * group_size, samples of a prompt adjacent.
      group_size: samples per prompt.
      normalize: divide by the group's standard deviation.
      eps: floor for groups whose samples all scored the same.

    Returns:
      advantages_b [B] (broadcast over tokens by the caller).
    """
    b = scores_b.shape[0]
    if b % group_size:
        raise ValueError(f"group_relative: batch {b} is not a multiple of group_size {group_size}")
    s_pg = scores_b.reshape(b // group_size, group_size)
    centred = s_pg - s_pg.mean(axis=1, keepdims=True)
    if normalize:
        centred = centred / (s_pg.std(axis=1, keepdims=True) + eps)
    return centred.reshape(b)


def terminal_rewards(scores_b, mask_bn):
    """Places each sequence's score on its last real token: r_t = s * [t == last(m)].

    Args:
      scores_b: [B] sequence-level scores (reward model or judge).
      mask_bn: [B, N] 1 on real response tokens (a prefix of each row).

    Returns:
      rewards_bn with one nonzero entry per row (none for an empty row).
    """
    mask_bn = mask_bn.astype(jnp.float32)
    n = mask_bn.shape[1]
    last = jnp.sum(mask_bn, axis=1).astype(jnp.int32) - 1
    onehot = (jnp.arange(n)[None, :] == last[:, None]).astype(jnp.float32)
    return onehot * scores_b[:, None].astype(jnp.float32)


def informative_groups(scores_b, group_size: int) -> np.ndarray:
    """DAPO's dynamic-sampling filter: which groups' scores are not all equal (host, numpy).

    A group whose G samples all scored the same has zero group-relative advantage everywhere,
    so it adds no gradient, only dilutes the batch.

    Args:
      scores_b: [B] scores, B = n_groups * group_size, a group's samples adjacent.
      group_size: G.

    Returns:
      bool [n_groups], True where max - min of the group's scores > 0.
    """
    s_gk = np.asarray(scores_b, np.float64).reshape(-1, group_size)
    return s_gk.max(1) > s_gk.min(1)


def overlong_penalty(lengths_b, max_len: int, buffer: int, factor: float = 1.0):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the sequence score.

        P(|y|) = 0                                   |y| <= N - L
        P(|y|) = factor * ((N - L) - |y|) / L        N - L < |y| <= N     (reaches -factor at N)

    with N = max_len (generation stops there: a response of N tokens was cut) and L = buffer.

    Args:
      lengths_b: [B] response lengths in tokens.
      max_len: N.
      buffer: L, the soft zone before the limit (0 = no penalty).
      factor: the penalty at the limit.

    Returns:
      [B] float32 penalties (<= 0).
    """
    lengths_b = np.asarray(lengths_b, np.float32)
    if buffer <= 0:
        return np.zeros_like(lengths_b)
    over = lengths_b - (max_len - buffer)
    return (-factor * np.clip(over / buffer, 0.0, 1.0)).astype(np.float32)
