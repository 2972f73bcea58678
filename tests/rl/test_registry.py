"""The objective registry: every estimator and loss against a hand-computed example, the four
TRL loss types against TRL's formula, exact grad accumulation, and the name errors.

TRL reference: trl 1.16.0, `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py), read from
the wheel (`pip download --no-deps trl==1.16.0`) and transcribed to numpy below; TRL is not a
dependency. Tolerance: rtol 1e-5, atol 1e-6 (float32 JAX against float64 numpy).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fft.config_lib import ConfigError
from fft.rl import kl as kl_lib
from fft.rl import registry

# ---------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------

MASK = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], np.float32)


def _adv(name, scores, group_size=4, rewards=None, values=None, mask=MASK, whiten=False):
    x = registry.AdvantageInputs(
        jnp.asarray(scores, jnp.float32),
        jnp.asarray(rewards if rewards is not None else np.zeros_like(mask)),
        jnp.asarray(values if values is not None else np.zeros_like(mask)),
        jnp.asarray(mask),
    )
    s = registry.AdvantageSettings(group_size=group_size, gamma=1.0, lam=0.5, whiten=whiten)
    return registry.ADVANTAGES[name].fn(x, s)


def _gae_case():
    # delta = (0.1, 0.1, 0.3); A2 = 0.3, A1 = 0.1 + 0.5 * 0.3, A0 = 0.1 + 0.5 * 0.25.
    a, ret = _adv(
        "gae", [1.0], 1, rewards=[[0.0, 0.0, 1.0]], values=[[0.5, 0.6, 0.7]], mask=np.ones((1, 3))
    )
    np.testing.assert_allclose(a, [[0.225, 0.25, 0.3]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.725, 0.85, 1.0]], atol=1e-6)


def _grpo_case():
    # scores 1, 0, 0, 1: mean 0.5, population std 0.5 -> +-1 (eps 1e-6 -> ~1e-6 off).
    a, ret = _adv("grpo", [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(a, np.array([1, -1, -1, 1])[:, None] * MASK, atol=1e-5)
    assert not np.asarray(ret).any()


def _dr_grpo_case():
    # scores 3, 1, 1, 3: mean 2, no std division -> +-1 (a std of 1 would give the same, so
    # check a group whose std is not 1: 4, 0, 0, 0 -> mean 1 -> 3, -1, -1, -1).
    a, _ = _adv("dr_grpo", [4.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(a, np.array([3, -1, -1, -1])[:, None] * MASK, atol=1e-6)


def _rloo_case():
    # scores 4, 0, 0, 2: A_0 = 4 - (0+0+2)/3 = 10/3; A_1 = 0 - (4+0+2)/3 = -2; A_3 = 2 - 4/3.
    a, _ = _adv("rloo", [4.0, 0.0, 0.0, 2.0])
    want = np.array([10 / 3, -2.0, -2.0, 2 / 3])[:, None] * MASK
    np.testing.assert_allclose(a, want, atol=1e-5)


ADVANTAGE_CASES = {"gae": _gae_case, "grpo": _grpo_case, "dr_grpo": _dr_grpo_case,
                   "rloo": _rloo_case}  # fmt: skip


@pytest.mark.parametrize("name", sorted(registry.ADVANTAGES))
def test_advantage_hand_computed(name):
    assert name in ADVANTAGE_CASES, f"registered estimator {name!r} has no hand-computed test"
    ADVANTAGE_CASES[name]()


def test_group_estimators_need_groups():
    assert registry.ADVANTAGES["gae"].critic and not registry.ADVANTAGES["gae"].group
    for name in ("grpo", "dr_grpo", "rloo"):
        assert registry.ADVANTAGES[name].group and not registry.ADVANTAGES[name].critic


# ---------------------------------------------------------------------------------------------
# Policy losses, by hand
# ---------------------------------------------------------------------------------------------

# Two sequences; ratios rho = pi / pi_old per token, the last token of row 1 is padding.
RATIO = np.array([[1.5, 1.0, 0.5], [1.0, 1.1, 7.0]])
LOSS_MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
ADV = np.array([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
# Clip 0.2 / 0.2, l = max(-A rho, -A clip(rho)):
#   row 0 (A = 1):  rho 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); 1.0 -> -1; 0.5 -> max(-.5, -.8)
#   row 1 (A = -2): rho 1.0 -> 2; 1.1 -> 2.2 (inside the range)
ROW0, ROW1 = [-1.2, -1.0, -0.5], [2.0, 2.2]
CTX = registry.ReduceContext(max_len=4, rollout_mean_len_b=jnp.array([2.0, 2.0]))


def _loss(name, clip_low=0.2, clip_high=None, ratio=RATIO, adv=ADV, mask=LOSS_MASK, ctx=CTX):
    spec = registry.LOSSES[name]
    lo, hi = registry.clip_range(spec, clip_low, clip_high or 0.0)
    loss, weight, clip_frac = registry.policy_loss(
        spec, jnp.log(jnp.asarray(ratio, jnp.float32)), jnp.zeros(ratio.shape), jnp.asarray(adv),
        jnp.asarray(mask), ctx, clip_low=lo, clip_high=hi,
    )  # fmt: skip
    return float(loss), float(weight), float(clip_frac)


def _ppo_clip_case():
    loss, weight, clip_frac = _loss("ppo_clip")
    # Token mean over the 5 real tokens; weight = 5 tokens; 1 of 5 clipped.
    np.testing.assert_allclose([loss, weight, clip_frac], [sum(ROW0 + ROW1) / 5, 5, 0.2], atol=1e-6)


def _grpo_loss_case():
    loss, weight, _ = _loss("grpo")
    # Per-sequence means -0.9 and 2.1, then their mean; weight = 2 sequences.
    np.testing.assert_allclose([loss, weight], [(sum(ROW0) / 3 + sum(ROW1) / 2) / 2, 2], atol=1e-6)


def _dr_grpo_loss_case():
    loss, weight, _ = _loss("dr_grpo")
    # Sum 1.5 over B * N = 2 * 4.
    np.testing.assert_allclose([loss, weight], [1.5 / 8, 2], atol=1e-6)


def _dapo_case():
    loss, weight, clip_frac = _loss("dapo")
    # Clip-higher 0.28 by default: rho 1.5 -> 1.28, so row 0 is -1.28, -1, -0.5; row 1 as before.
    # Divided by the rollout's token count for these rows: 2 rows x mean length 2 = 4.
    np.testing.assert_allclose([loss, weight, clip_frac], [1.42 / 4, 2, 0.2], atol=1e-6)
    # An explicit clip_eps_high wins over the loss's default.
    np.testing.assert_allclose(_loss("dapo", clip_high=0.2)[0], 1.5 / 4, atol=1e-6)


def _gspo_case():
    loss, weight, clip_frac = _loss("gspo")
    # s_0 = (1.5 * 1 * 0.5)^(1/3) = 0.9086 (inside [0.8, 1.2]) -> -0.9086
    # s_1 = (1 * 1.1)^(1/2) = 1.0488 -> 2 * 1.0488; mean over the 2 sequences.
    s0, s1 = 0.75 ** (1 / 3), math.sqrt(1.1)
    np.testing.assert_allclose([loss, weight, clip_frac], [(-s0 + 2 * s1) / 2, 2, 0], atol=1e-6)
    # A sequence clip that binds: 0.01 -> s_1 = 1.0488 above 1.01, A < 0: max(2.098, 2.02).
    # (pessimistic: unclipped), s_0 = 0.9086 below 0.99 with A > 0: max(-0.9086, -0.99) likewise;
    # flip the advantage signs and both clip.
    loss, _, clip_frac = _loss("gspo", clip_low=0.01, clip_high=0.01, adv=-ADV)
    np.testing.assert_allclose([loss, clip_frac], [(0.99 - 2 * 1.01) / 2, 1.0], atol=1e-6)


LOSS_CASES = {"ppo_clip": _ppo_clip_case, "grpo": _grpo_loss_case, "dr_grpo": _dr_grpo_loss_case,
              "dapo": _dapo_case, "gspo": _gspo_case}  # fmt: skip


@pytest.mark.parametrize("name", sorted(registry.LOSSES))
def test_loss_hand_computed(name):
    assert name in LOSS_CASES, f"registered loss {name!r} has no hand-computed test"
    LOSS_CASES[name]()


def test_gspo_gradient_is_the_mean_token_gradient():
    """GSPO's ratio is the geometric mean of the token ratios: at rho = 1 its gradient spreads
    -A / |o_i| over the tokens of sequence i (and 1/B over sequences)."""
    spec = registry.LOSSES["gspo"]
    mask = jnp.asarray(LOSS_MASK)

    def f(logp):
        return registry.policy_loss(
            spec, logp, jnp.zeros((2, 3)), jnp.asarray(ADV), mask, CTX, clip_low=0.2,
            clip_high=0.2,
        )[0]  # fmt: skip

    g = jax.grad(f)(jnp.zeros((2, 3)))
    np.testing.assert_allclose(g, [[-1 / 6] * 3, [1 / 2, 1 / 2, 0]], atol=1e-6)


@pytest.mark.parametrize("name", sorted(registry.LOSSES))
def test_loss_weight_makes_accumulation_exact(name):
    """sum_k w_k L_k / sum_k w_k over row splits equals the loss of the whole batch: what the
    train step computes under grad_accum (fft/train/step.py)."""
    rng = np.random.default_rng(0)
    b, n = 6, 5
    ratio = np.exp(rng.normal(0, 0.3, (b, n)))
    adv = np.repeat(rng.normal(size=(b, 1)), n, 1)
    mask = (np.arange(n)[None] < rng.integers(1, n + 1, (b, 1))).astype(np.float32)
    mean_len = jnp.full((b,), mask.sum() / b)

    def run(rows):
        ctx = registry.ReduceContext(max_len=n, rollout_mean_len_b=mean_len[rows])
        return _loss(name, ratio=ratio[rows], adv=adv[rows], mask=mask[rows], ctx=ctx)

    full, _, _ = run(np.arange(b))
    parts = [run(np.arange(k, b, 3)) for k in range(3)]  # strided, as _split_microbatches
    np.testing.assert_allclose(
        sum(loss * w for loss, w, _ in parts) / sum(w for _, w, _ in parts), full, rtol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# Against TRL (trl 1.16.0, GRPOTrainer._compute_loss), importance_sampling_level="token"
# ---------------------------------------------------------------------------------------------


def _trl_loss(loss_type, logp, old, ref, adv_b, mask, *, beta, eps_low, eps_high, max_len,
              num_items_in_batch=None, steps_per_generation=1):  # fmt: skip
    """numpy transcription of trl 1.16.0 GRPOTrainer._compute_loss (one process, GA = 1)."""
    advantages = adv_b[:, None]
    coef_1 = np.exp(logp - old)
    per_token_kl = np.exp(ref - logp) - (ref - logp) - 1
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -np.minimum(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / max(mask.sum(), 1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_len)
    if loss_type == "dapo":
        normalizer = max(num_items_in_batch, 1.0) / 1  # / num_processes
        normalizer = normalizer * 1 / steps_per_generation  # * GA / steps_per_generation
        return (per_token_loss * mask).sum() / normalizer
    raise ValueError(loss_type)


# TRL loss type -> fft loss name (TRL's 'bnpo' is the token mean of one batch: ppo_clip).
TRL_TYPES = {"grpo": "grpo", "bnpo": "ppo_clip", "dr_grpo": "dr_grpo", "dapo": "dapo"}


@pytest.mark.parametrize("trl_type", sorted(TRL_TYPES))
def test_matches_trl(trl_type):
    rng = np.random.default_rng(1)
    b, n, max_len, beta = 8, 6, 6, 0.04
    eps_low, eps_high = 0.2, 0.28
    old = rng.normal(-2.0, 0.5, (b, n))
    logp = old + rng.normal(0, 0.3, (b, n))
    ref = old + rng.normal(0, 0.2, (b, n))
    adv_b = rng.normal(size=b)
    mask = (np.arange(n)[None] < rng.integers(1, n + 1, (b, 1))).astype(np.float64)
    spec = registry.LOSSES[TRL_TYPES[trl_type]]
    mean_len = np.full(b, mask.sum() / b)
    # DAPO spans the generation batch: check one of its two minibatches (steps_per_generation 2).
    rows = np.arange(b // 2) if trl_type == "dapo" else np.arange(b)

    want = _trl_loss(
        trl_type, logp[rows], old[rows], ref[rows], adv_b[rows], mask[rows], beta=beta,
        eps_low=eps_low, eps_high=eps_high, max_len=max_len, num_items_in_batch=mask.sum(),
        steps_per_generation=2,
    )  # fmt: skip

    f32 = lambda x: jnp.asarray(x[rows], jnp.float32)  # noqa: E731
    lp, m = f32(logp), f32(mask)
    penalty = beta * kl_lib.kl_k3(lp, f32(ref))
    ctx = registry.ReduceContext(max_len=max_len, rollout_mean_len_b=f32(mean_len))
    adv_bn = jnp.broadcast_to(f32(adv_b)[:, None], lp.shape)
    got, _, _ = registry.policy_loss(
        spec, lp, f32(old), adv_bn, m, ctx, clip_low=eps_low, clip_high=eps_high,
        penalty_bn=penalty,
    )  # fmt: skip
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def test_algo_presets():
    adv, loss = registry.resolve("grpo")
    assert (adv.name, loss.name, adv.critic) == ("grpo", "ppo_clip", False)
    adv, loss = registry.resolve("ppo")
    assert (adv.name, loss.name, adv.critic) == ("gae", "ppo_clip", True)
    adv, loss = registry.resolve("grpo", "rloo", "gspo")  # explicit names override the preset
    assert (adv.name, loss.name) == ("rloo", "gspo")
    for algo, (a, lo) in registry.ALGOS.items():
        assert a in registry.ADVANTAGES and lo in registry.LOSSES, algo


def test_unknown_names_are_one_config_error_listing_the_registered():
    with pytest.raises(ConfigError, match=r"config.rlhf.loss='ppo2'.*dapo, dr_grpo, grpo, gspo"):
        registry.resolve("ppo", loss_name="ppo2")
    with pytest.raises(ConfigError, match=r"config.rlhf.advantage='vtrace'.*gae, grpo"):
        registry.resolve("ppo", advantage_name="vtrace")
    with pytest.raises(ConfigError, match=r"config.rlhf.algo='a2c'"):
        registry.resolve("a2c")
