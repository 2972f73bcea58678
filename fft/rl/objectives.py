"""RL and preference objectives — pure functions, the formula in each docstring.

Token-level losses take `[B, N]` arrays and a mask and average over masked tokens of the whole
batch ("token mean"). Sequence-level losses take `[B]` (pairs) or `[B, K]` (rankings) scores and
return the mean over examples; padding candidates in rankings carry rank -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fft.rl.advantages import masked_mean

# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------


def clipped_surrogate(ratio_bn, advantages_bn, *, clip_low: float, clip_high: float):
    """Per-token clipped surrogate (Schulman et al. 2017) with an asymmetric clip (DAPO).

        l_t       = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high))
        clipped_t = [ -A_t clip(rho_t) > -A_t rho_t ]          (the clip binds: no gradient)

    Args:
      ratio_bn: importance ratios rho (differentiated), any shape broadcasting with A.
      advantages_bn: advantage estimates (constants).
      clip_low, clip_high: the clip range [1 - clip_low, 1 + clip_high].

    Returns:
      (l_bn, clipped_bn) before any masking or averaging.
    """
    unclipped = -advantages_bn * ratio_bn
    clipped = -advantages_bn * jnp.clip(ratio_bn, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)


def ppo_policy_loss(logp_bn, old_logp_bn, advantages_bn, mask_bn, *, clip_eps: float = 0.2):
    """Clipped surrogate objective (Schulman et al. 2017), as a loss.

        rho_t = exp(log pi(x_t) - log pi_old(x_t))
        L     = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
        clip_fraction = mean_t [ -A_t clip(rho_t) > -A_t rho_t ]   (tokens where the clip binds)

    Args:
      logp_bn: log-probs of the sampled tokens under the current policy (differentiated).
      old_logp_bn: log-probs under the policy that sampled them (constants).
      advantages_bn: advantage estimates (constants).
      mask_bn: 1 on real response tokens.
      clip_eps: epsilon of the clip range.

    Returns:
      (loss, clip_fraction, approx_kl) where approx_kl = mean_t (rho_t - 1 - log rho_t) is the
      k3 estimate of KL(pi_old || pi), a diagnostic of how far the update moved.
    """
    mask_bn = mask_bn.astype(jnp.float32)
    log_ratio = logp_bn - old_logp_bn
    ratio = jnp.exp(log_ratio)
    loss_bn, clipped_bn = clipped_surrogate(
        ratio, advantages_bn, clip_low=clip_eps, clip_high=clip_eps
    )
    loss = masked_mean(loss_bn, mask_bn)
    clip_fraction = masked_mean(clipped_bn, mask_bn)
    approx_kl = masked_mean(jax.lax.stop_gradient(ratio - 1.0 - log_ratio), mask_bn)
    return loss, clip_fraction, approx_kl


def value_loss_per_token(values_bn, old_values_bn, returns_bn, *, clip: float = 0.2):
    """Per-token clipped value loss (PPO2 / InstructGPT), before masking or averaging.

        V_clip = old_V + clip(V - old_V, -c, c)
        l_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)      (0.5 * (V - R)^2 when c <= 0)
        clipped_t = [ (V_clip - R)^2 > (V - R)^2 ]

    Returns:
      (l_bn, clipped_bn).
    """
    err = jnp.square(values_bn - returns_bn)
    if clip <= 0:
        return 0.5 * err, jnp.zeros_like(err)
    v_clip = old_values_bn + jnp.clip(values_bn - old_values_bn, -clip, clip)
    err_clip = jnp.square(v_clip - returns_bn)
    return 0.5 * jnp.maximum(err, err_clip), (err_clip > err).astype(jnp.float32)


def value_loss(values_bn, old_values_bn, returns_bn, mask_bn, *, clip: float = 0.2):
    """Clipped value loss (PPO2 / InstructGPT), a token mean of `value_loss_per_token`.

        V_clip = old_V + clip(V - old_V, -c, c)
        L      = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)
        clip_fraction = mean_t [ (V_clip - R)^2 > (V - R)^2 ]

    `clip <= 0` turns clipping off: L = 0.5 * mean_t (V - R)^2.

    Args:
      values_bn: current value predictions (differentiated).
      old_values_bn: predictions at rollout time (constants).
      returns_bn: value targets R_t from GAE.
      mask_bn: 1 on real response tokens.
      clip: c.

    Returns:
      (loss, clip_fraction).
    """
    mask_bn = mask_bn.astype(jnp.float32)
    l_bn, clipped_bn = value_loss_per_token(values_bn, old_values_bn, returns_bn, clip=clip)
    return masked_mean(l_bn, mask_bn), masked_mean(clipped_bn, mask_bn)


def entropy_from_logits(logits_btv):
    """Entropy of the categorical distribution at each position.

        H = logsumexp(z) - sum_v softmax(z)_v z_v

    Args:
      logits_btv: [..., V] logits.

    Returns:
      [...] entropies in nats.
    """
    logits_btv = logits_btv.astype(jnp.float32)
    p = jax.nn.softmax(logits_btv, axis=-1)
    return jax.nn.logsumexp(logits_btv, axis=-1) - jnp.sum(p * logits_btv, axis=-1)


# ---------------------------------------------------------------------------------------------
# Direct preference optimisation
# ---------------------------------------------------------------------------------------------


def preference_logits(pi_chosen_b, pi_rejected_b, ref_chosen_b, ref_rejected_b):
    """h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), per pair."""
    return (pi_chosen_b - ref_chosen_b) - (pi_rejected_b - ref_rejected_b)


def dpo_loss(
    pi_chosen_b, pi_rejected_b, ref_chosen_b, ref_rejected_b, *, beta: float = 0.1,
    label_smoothing: float = 0.0,
):  # fmt: skip
    """DPO (Rafailov et al. 2023), with optional conservative label smoothing (cDPO).

        h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
        L = -(1 - s) log sigmoid(beta h) - s log sigmoid(-beta h)        (mean over pairs)
        implicit rewards: r_w = beta (log pi(y_w) - log pi_ref(y_w)), r_l likewise

    Args:
      pi_chosen_b, pi_rejected_b: summed response log-probs under the policy, [B].
      ref_chosen_b, ref_rejected_b: the same under the reference, [B].
      beta: inverse temperature of the implicit reward.
      label_smoothing: s, the assumed probability that a label is flipped.

    Returns:
      (loss, metrics) with metrics {'reward_chosen', 'reward_rejected', 'reward_margin',
      'reward_accuracy'} (means over pairs).
    """
    h = preference_logits(pi_chosen_b, pi_rejected_b, ref_chosen_b, ref_rejected_b)
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
    losses = losses - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    return losses.mean(), _implicit_reward_metrics(
        pi_chosen_b, pi_rejected_b, ref_chosen_b, ref_rejected_b, beta
    )


def ipo_loss(pi_chosen_b, pi_rejected_b, ref_chosen_b, ref_rejected_b, *, beta: float = 0.1):
    """IPO (Azar et al. 2023): regress the log-ratio gap onto 1 / (2 beta).

        L = (h - 1 / (2 beta))^2          (mean over pairs; h as in `dpo_loss`)

    Azar et al. use length-averaged log-probs for h; the caller decides what it passes.

    Returns:
      (loss, metrics) as in `dpo_loss`.
    """
    h = preference_logits(pi_chosen_b, pi_rejected_b, ref_chosen_b, ref_rejected_b)
    loss = jnp.mean(jnp.square(h - 1.0 / (2.0 * beta)))
    return loss, _implicit_reward_metrics(
        pi_chosen_b, pi_rejected_b, ref_chosen_b, ref_rejected_b, beta
    )


def _implicit_reward_metrics(pi_c, pi_r, ref_c, ref_r, beta):
    r_c = beta * (pi_c - ref_c)
    r_r = beta * (pi_r - ref_r)
    return {
        "reward_chosen": r_c.mean(),
        "reward_rejected": r_r.mean(),
        "reward_margin": (r_c - r_r).mean(),
        "reward_accuracy": (r_c > r_r).astype(jnp.float32).mean(),
    }


# ---------------------------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen_b, r_rejected_b, *, margin=0.0):
    """Pairwise Bradley–Terry loss (InstructGPT; Llama-2 adds a margin).

        L = -mean log sigmoid(r_w - r_l - margin)

    Args:
      r_chosen_b, r_rejected_b: reward-model scores, [B].
      margin: scalar or [B] required gap (e.g. from a preference-strength label).

    Returns:
      loss (scalar).
    """
    return -jnp.mean(jax.nn.log_sigmoid(r_chosen_b - r_rejected_b - margin))


def all_pairs_bradley_terry_loss(scores_bk, ranks_bk, *, margin: float = 0.0):
    """Bradley–Terry over every pair a K-way ranking implies (InstructGPT: all C(K,2) pairs).

        L = -mean_{(i,j): rank_i < rank_j} log sigmoid(s_i - s_j - margin)

    The mean runs over all valid pairs of the whole batch (rank -1 = padding candidate).

    Args:
      scores_bk: scores of K candidates per prompt, [B, K].
      ranks_bk: rank of each candidate, 0 = best; -1 = padding.

    Returns:
      loss (scalar).
    """
    better = ranked_pairs(ranks_bk)
    diff = scores_bk[:, :, None] - scores_bk[:, None, :] - margin
    return -jnp.sum(jax.nn.log_sigmoid(diff) * better) / jnp.maximum(better.sum(), 1.0)


def ranked_pairs(ranks_bk):
    """[B, K, K] f32: 1 where candidate i is ranked above candidate j (both valid, rank >= 0).

    Its sum is the number of pairs `all_pairs_bradley_terry_loss` averages over.
    """
    valid = ranks_bk >= 0
    better = (ranks_bk[:, :, None] < ranks_bk[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    return better.astype(jnp.float32)


def plackett_luce_loss(scores_bk, ranks_bk):
    """Negative log-likelihood of a full ranking under Plackett–Luce.

    With pi the ranking (pi_1 best) of the valid candidates:

        -log P(pi) = -sum_i [ s_{pi_i} - log sum_{j >= i} exp(s_{pi_j}) ]

    Averaged over the batch. For K = 2 this equals the Bradley–Terry loss.

    Args:
      scores_bk: [B, K] scores.
      ranks_bk: [B, K] ranks, 0 = best, distinct among valid candidates; -1 = padding.

    Returns:
      loss (scalar).
    """
    valid = ranks_bk >= 0
    # For candidate k: the candidates ranked at or below it (still "in the urn" when k is drawn).
    remaining = (ranks_bk[:, None, :] >= ranks_bk[:, :, None]) & valid[:, None, :]
    neg_inf = jnp.finfo(jnp.float32).min
    masked = jnp.where(remaining, scores_bk[:, None, :].astype(jnp.float32), neg_inf)
    log_denom = jax.nn.logsumexp(masked, axis=-1)
    terms = jnp.where(valid, scores_bk - log_denom, 0.0)
    return -jnp.mean(jnp.sum(terms, axis=-1))


def reward_centering_penalty(scores, mask=None):
    """Auxiliary loss keeping rewards near zero (Eisenstein et al. 2023, "Helping or Herding").

        P = mean(s^2)             over valid scores (mask = 1)

    Bradley–Terry and Plackett–Luce are invariant to a shift of all scores; this pins the shift
    so scores from different batches (and the PPO reward) stay on one scale.

    Args:
      scores: any-shape scores.
      mask: optional 0/1 (or bool) of the same shape.

    Returns:
      penalty (scalar); the caller multiplies it by its coefficient.
    """
    if mask is None:
        return jnp.mean(jnp.square(scores))
    return masked_mean(jnp.square(scores), mask.astype(jnp.float32))


def pairwise_accuracy(r_chosen_b, r_rejected_b):
    """Fraction of pairs the scores order correctly (ties count as half)."""
    return jnp.mean(
        (r_chosen_b > r_rejected_b).astype(jnp.float32)
        + 0.5 * (r_chosen_b == r_rejected_b).astype(jnp.float32)
    )
