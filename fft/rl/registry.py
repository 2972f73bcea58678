"""Policy-gradient objectives by name: advantage estimators and policy losses.

`--config.rlhf.advantage=NAME` picks how a rollout's scores become per-token advantages,
`--config.rlhf.loss=NAME` the surrogate and how its per-token terms are averaged;
`--config.rlhf.algo` is a preset of both (`ALGOS`), used where those two are ''.

Adding an objective is one decorated function here plus its hand-computed test in
tests/rl/test_registry.py, and nothing else:

    @advantage("name", group=True)        # group=True: needs G samples per prompt, no critic
    def name(x: AdvantageInputs, s: AdvantageSettings):
        '''The formula.'''
        return advantages_bn, returns_bn

    @loss("name", reduce="token_mean")     # how per-token terms become the loss: see REDUCERS
    def name(logp_bn, old_logp_bn, adv_bn, mask_bn, clip_low, clip_high):
        '''The formula.'''
        return loss_bn, clipped_bn         # per-token loss, 1 where the clip binds

The learner (`fft.rl.ppo`) adds the in-loss KL, entropy and value terms per token and reduces
the sum with the loss's reducer, which also gives the train step its `loss_weight`, so gradient
accumulation stays exact whatever the normalisation.

Shapes: `[B, N]` over the response tokens; `mask_bn` is 1 on real response tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

from fft.config_lib import ConfigError
from fft.rl import advantages as adv_lib
from fft.rl import objectives

# ---------------------------------------------------------------------------------------------
# The registries
# ---------------------------------------------------------------------------------------------


class AdvantageInputs(NamedTuple):
    """What an estimator may read (all masked to the response, `[B, N]` unless noted)."""

    scores_b: jnp.ndarray  # [B] sequence scores (reward, after any shaping)
    rewards_bn: jnp.ndarray  # score on the last token minus beta * KL_t (critic estimators)
    values_bn: jnp.ndarray  # value head at rollout time (zeros without a critic)
    mask_bn: jnp.ndarray  # 1 on real response tokens


@dataclasses.dataclass(frozen=True)
class AdvantageSettings:
    """Static settings of the estimators (hashable: a jit static argument)."""

    group_size: int = 1  # G, samples of one prompt adjacent in the batch
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    whiten: bool = True  # GAE: whiten advantages over the batch's response tokens


@dataclasses.dataclass(frozen=True)
class Advantage:
    """A registered estimator: `fn(AdvantageInputs, AdvantageSettings) -> (adv_bn, ret_bn)`.

    critic: it needs a value head (trained on the returns) and takes the KL as a per-token
      reward penalty; otherwise the KL is a term of the loss.
    group: it compares the G samples of a prompt (needs group_size >= 2).
    """

    name: str
    fn: Callable
    critic: bool
    group: bool


@dataclasses.dataclass(frozen=True)
class Loss:
    """A registered policy loss: per-token `fn` and the `reduce` that averages it.

    clip_high: the upper clip this loss uses when `rlhf.clip_eps_high` is 0 (None: clip_eps).
    """

    name: str
    fn: Callable
    reduce: str
    clip_high: float | None


ADVANTAGES: dict[str, Advantage] = {}
LOSSES: dict[str, Loss] = {}


def advantage(name: str, *, critic: bool = False, group: bool = False):
    """Decorator registering an advantage estimator under `name` (see the module docstring)."""

    def register(fn):
        ADVANTAGES[name] = Advantage(name, fn, critic, group)
        return fn

    return register


def loss(name: str, *, reduce: str, clip_high: float | None = None):
    """Decorator registering a policy loss under `name` with reducer `reduce` (REDUCERS)."""
    if reduce not in REDUCERS:
        raise ValueError(f"loss {name!r}: reduce={reduce!r} is not one of {sorted(REDUCERS)}")

    def register(fn):
        LOSSES[name] = Loss(name, fn, reduce, clip_high)
        return fn

    return register


# algo -> (advantage, loss): the presets `rlhf.algo` names.
ALGOS = {
    "ppo": ("gae", "ppo_clip"),
    "grpo": ("grpo", "ppo_clip"),
    "dr_grpo": ("dr_grpo", "dr_grpo"),
    "dapo": ("grpo", "dapo"),
    "gspo": ("grpo", "gspo"),
    "rloo": ("rloo", "ppo_clip"),
}


def resolve(algo: str, advantage_name: str = "", loss_name: str = "") -> tuple[Advantage, Loss]:
    """The estimator and loss a config names ('' = the `algo` preset's); ConfigError if unknown.

    Args:
      algo: a key of ALGOS.
      advantage_name, loss_name: registry names overriding the preset ('' keeps it).

    Returns:
      (Advantage, Loss).
    """
    if algo not in ALGOS:
        raise ConfigError(f"config.rlhf.algo={algo!r}: choose one of {', '.join(ALGOS)}.")
    a_name = advantage_name or ALGOS[algo][0]
    l_name = loss_name or ALGOS[algo][1]
    if a_name not in ADVANTAGES:
        raise ConfigError(
            f"config.rlhf.advantage={a_name!r}: registered estimators are "
            f"{', '.join(sorted(ADVANTAGES))}."
        )
    if l_name not in LOSSES:
        raise ConfigError(
            f"config.rlhf.loss={l_name!r}: registered losses are {', '.join(sorted(LOSSES))}."
        )
    return ADVANTAGES[a_name], LOSSES[l_name]


# ---------------------------------------------------------------------------------------------
# Reducers: per-token terms -> (loss, loss_weight)
# ---------------------------------------------------------------------------------------------


class ReduceContext(NamedTuple):
    """What a reducer may need beyond the terms and the mask."""

    max_len: int  # N, the generation limit (rlhf.max_new_tokens)
    rollout_mean_len_b: jnp.ndarray | None  # [B] the whole rollout's mean response length


def _token_mean(x_bn, mask_bn, ctx):
    """sum_bt m x / sum_bt m over this batch; weight = its token count."""
    del ctx
    n = jnp.sum(mask_bn)
    return jnp.sum(x_bn * mask_bn) / jnp.maximum(n, 1.0), n


def _sequence_mean(x_bn, mask_bn, ctx):
    """mean_b (sum_t m x / max(n_b, 1)): each sequence counts once (GRPO's 1/G 1/|o_i|)."""
    del ctx
    per_seq = jnp.sum(x_bn * mask_bn, 1) / jnp.maximum(jnp.sum(mask_bn, 1), 1.0)
    return jnp.mean(per_seq), jnp.float32(x_bn.shape[0])


def _fixed_length(x_bn, mask_bn, ctx):
    """sum_bt m x / (B * N): a sum per sequence over a constant length (Dr. GRPO)."""
    return jnp.sum(x_bn * mask_bn) / (x_bn.shape[0] * ctx.max_len), jnp.float32(x_bn.shape[0])


def _rollout_token_mean(x_bn, mask_bn, ctx):
    """sum_bt m x / (B * mean rollout length): the token mean over the whole rollout (DAPO).

    Every minibatch divides by the same rollout-wide count (its share of it), so the updates
    of one rollout together average over all its tokens, as DAPO's 1 / sum_i |o_i|.
    """
    denom = jnp.sum(jnp.maximum(ctx.rollout_mean_len_b, 1.0))
    return jnp.sum(x_bn * mask_bn) / denom, jnp.float32(x_bn.shape[0])


REDUCERS = {
    "token_mean": _token_mean,
    "sequence_mean": _sequence_mean,
    "fixed_length": _fixed_length,
    "rollout_token_mean": _rollout_token_mean,
}


def reduce(loss_spec: Loss, x_bn, mask_bn, ctx: ReduceContext):
    """`(value, loss_weight)` of per-token terms `x_bn` under the loss's reducer."""
    return REDUCERS[loss_spec.reduce](x_bn, mask_bn.astype(jnp.float32), ctx)


def clip_range(loss_spec: Loss, clip_eps: float, clip_eps_high: float) -> tuple[float, float]:
    """(clip_low, clip_high): `clip_eps_high` if set (> 0), else the loss's own, else clip_eps."""
    if clip_eps_high > 0:
        return clip_eps, clip_eps_high
    return clip_eps, loss_spec.clip_high if loss_spec.clip_high is not None else clip_eps


def policy_loss(
    loss_spec: Loss,
    logp_bn,
    old_logp_bn,
    adv_bn,
    mask_bn,
    ctx: ReduceContext,
    *,
    clip_low: float,
    clip_high: float,
    penalty_bn=None,
):
    """The reduced policy loss: reduce(l_t + penalty_t) and its weight and clip fraction.

    Args:
      loss_spec: from `resolve`.
      logp_bn, old_logp_bn, adv_bn, mask_bn: current / sampling log-probs, advantages, mask.
      ctx: the reducer's context.
      clip_low, clip_high: the clip range (`clip_range`).
      penalty_bn: per-token terms added before reducing (beta * KL, as TRL's GRPO), or None.

    Returns:
      (loss, loss_weight, clip_fraction) with clip_fraction a token mean.
    """
    mask_bn = mask_bn.astype(jnp.float32)
    l_bn, clipped_bn = loss_spec.fn(logp_bn, old_logp_bn, adv_bn, mask_bn, clip_low, clip_high)
    if penalty_bn is not None:
        l_bn = l_bn + penalty_bn
    value, weight = reduce(loss_spec, l_bn, mask_bn, ctx)
    return value, weight, adv_lib.masked_mean(clipped_bn, mask_bn)


# ---------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------


@advantage("gae", critic=True)
def gae(x: AdvantageInputs, s: AdvantageSettings):
    """GAE (Schulman et al. 2016) on r_t = s [t last] - beta KL_t, whitened when `s.whiten`.

    delta_t = r_t + gamma V_{t+1} - V_t;   A_t = delta_t + gamma lam A_{t+1};   R_t = A_t + V_t
    """
    adv_bn, ret_bn = adv_lib.gae(x.rewards_bn, x.values_bn, x.mask_bn, gamma=s.gamma, lam=s.lam)
    if s.whiten:
        adv_bn = adv_lib.whiten(adv_bn, x.mask_bn)
    return adv_bn, ret_bn


def _per_token(adv_b, mask_bn):
    """A sequence advantage on every response token; no returns (no critic)."""
    return adv_b[:, None] * mask_bn, jnp.zeros_like(mask_bn)


@advantage("grpo", group=True)
def grpo(x: AdvantageInputs, s: AdvantageSettings):
    """GRPO (Shao et al. 2024): A_i = (s_i - mean_g s) / (std_g s + 1e-6), population std."""
    return _per_token(adv_lib.group_relative(x.scores_b, s.group_size), x.mask_bn)


@advantage("dr_grpo", group=True)
def dr_grpo(x: AdvantageInputs, s: AdvantageSettings):
    """Dr. GRPO (Liu et al. 2025): A_i = s_i - mean_g s (no std: no difficulty bias)."""
    adv_b = adv_lib.group_relative(x.scores_b, s.group_size, normalize=False)
    return _per_token(adv_b, x.mask_bn)


@advantage("rloo", group=True)
def rloo(x: AdvantageInputs, s: AdvantageSettings):
    """RLOO (Ahmadian et al. 2024): the mean of the other G - 1 samples as the baseline.

    A_i = s_i - 1/(G-1) sum_{j != i} s_j = G/(G-1) (s_i - mean_g s)
    """
    g = s.group_size
    return _per_token(
        adv_lib.group_relative(x.scores_b, g, normalize=False) * g / (g - 1), x.mask_bn
    )


# ---------------------------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------------------------


def _token_ratio_loss(logp_bn, old_logp_bn, adv_bn, clip_low, clip_high):
    return objectives.clipped_surrogate(
        jnp.exp(logp_bn - old_logp_bn), adv_bn, clip_low=clip_low, clip_high=clip_high
    )


@loss("ppo_clip", reduce="token_mean")
def ppo_clip(logp_bn, old_logp_bn, adv_bn, mask_bn, clip_low, clip_high):
    """PPO's clipped surrogate, averaged over the minibatch's tokens (TRL's 'bnpo').

    L = sum_it m max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) / sum_it m
    """
    del mask_bn
    return _token_ratio_loss(logp_bn, old_logp_bn, adv_bn, clip_low, clip_high)


@loss("grpo", reduce="sequence_mean")
def grpo_loss(logp_bn, old_logp_bn, adv_bn, mask_bn, clip_low, clip_high):
    """GRPO's loss as published: each sequence's token mean, then the mean over sequences.

    L = 1/B sum_i 1/|o_i| sum_t max(-A rho, -A clip(rho))      (TRL's 'grpo')
    """
    del mask_bn
    return _token_ratio_loss(logp_bn, old_logp_bn, adv_bn, clip_low, clip_high)


@loss("dr_grpo", reduce="fixed_length")
def dr_grpo_loss(logp_bn, old_logp_bn, adv_bn, mask_bn, clip_low, clip_high):
    """Dr. GRPO (Liu et al. 2025): sum over tokens divided by a constant B * N, not |o_i|.

    L = 1/(B N) sum_it m max(-A rho, -A clip(rho))             (TRL's 'dr_grpo')
    """
    del mask_bn
    return _token_ratio_loss(logp_bn, old_logp_bn, adv_bn, clip_low, clip_high)


@loss("dapo", reduce="rollout_token_mean", clip_high=0.28)
def dapo(logp_bn, old_logp_bn, adv_bn, mask_bn, clip_low, clip_high):
    """DAPO (Yu et al. 2025): clip-higher (1 + 0.28 by default) and a token mean over the rollout.

    L = 1/sum_i |o_i| sum_it m max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))
    """
    del mask_bn
    return _token_ratio_loss(logp_bn, old_logp_bn, adv_bn, clip_low, clip_high)


@loss("gspo", reduce="sequence_mean")
def gspo(logp_bn, old_logp_bn, adv_bn, mask_bn, clip_low, clip_high):
    """GSPO (Zheng et al. 2025): one length-normalised ratio per sequence, clipped as a whole.

        s_i = exp(1/|o_i| sum_t m (log pi - log pi_old));   A_i = the mean of A over o_i
        L   = 1/B sum_i max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high))

    The paper clips at 3e-4 / 4e-4 (a sequence ratio moves far less than a token's).
    """
    n_b = jnp.maximum(jnp.sum(mask_bn, 1), 1.0)
    log_s_b = jnp.sum((logp_bn - old_logp_bn) * mask_bn, 1) / n_b
    adv_b = jnp.sum(adv_bn * mask_bn, 1) / n_b
    l_b, clipped_b = objectives.clipped_surrogate(
        jnp.exp(log_s_b), adv_b, clip_low=clip_low, clip_high=clip_high
    )
    # Broadcast over tokens: the sequence-mean reducer gives back l_b for every sequence.
    return l_b[:, None] * jnp.ones_like(mask_bn), clipped_b[:, None] * jnp.ones_like(mask_bn)
