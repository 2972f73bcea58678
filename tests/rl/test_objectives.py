"""PPO, value, entropy, DPO/IPO and reward-model losses against hand-computed numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from fft.rl import objectives as obj


def _nls(x):  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def test_ppo_policy_loss():
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.0]]))
    old = jnp.zeros((1, 3))
    a = jnp.array([[1.0, -1.0, 2.0]])
    # t0: max(-1.5, -1.2) = -1.2 (clipped); t1: max(0.5, 0.8) = 0.8 (clipped); t2: -2.
    loss, clipfrac, approx_kl = obj.ppo_policy_loss(logp, old, a, jnp.ones((1, 3)), clip_eps=0.2)
    np.testing.assert_allclose(loss, -0.8, atol=1e-6)
    np.testing.assert_allclose(clipfrac, 2 / 3, atol=1e-6)
    kl = (0.5 - math.log(1.5) + (-0.5 - math.log(0.5))) / 3
    np.testing.assert_allclose(approx_kl, kl, atol=1e-6)
    # Masking out the two clipped tokens leaves the unclipped one.
    loss, clipfrac, _ = obj.ppo_policy_loss(logp, old, a, jnp.array([[0.0, 0.0, 1.0]]))
    np.testing.assert_allclose([loss, clipfrac], [-2.0, 0.0], atol=1e-6)


def test_ppo_policy_gradient_zero_when_clipped():
    a = jnp.array([[1.0]])

    def f(lp):
        return obj.ppo_policy_loss(lp, jnp.zeros((1, 1)), a, jnp.ones((1, 1)))[0]

    assert float(jax.grad(f)(jnp.log(jnp.array([[1.5]])))[0, 0]) == 0.0
    np.testing.assert_allclose(jax.grad(f)(jnp.zeros((1, 1))), [[-1.0]])


def test_value_loss():
    v = jnp.array([[1.0, 0.0]])
    old = jnp.array([[0.5, 0.0]])
    ret = jnp.array([[1.0, 1.0]])
    loss, clipfrac = obj.value_loss(v, old, ret, jnp.ones((1, 2)), clip=0.2)
    np.testing.assert_allclose(loss, 0.5 * (0.09 + 1.0) / 2, atol=1e-6)
    np.testing.assert_allclose(clipfrac, 0.5)
    loss, _ = obj.value_loss(v, old, ret, jnp.ones((1, 2)), clip=0.0)
    np.testing.assert_allclose(loss, 0.25, atol=1e-6)


def test_entropy():
    logits = jnp.array([[0.0, 0.0], [0.0, math.log(3.0)]])
    h = obj.entropy_from_logits(logits)
    np.testing.assert_allclose(
        h, [math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))], atol=1e-6
    )


def test_dpo_and_ipo():
    args = (jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5]), jnp.array([-1.5]))
    loss, m = obj.dpo_loss(*args, beta=0.5)  # h = 1
    np.testing.assert_allclose(loss, _nls(0.5), atol=1e-6)
    np.testing.assert_allclose(
        [m["reward_chosen"], m["reward_rejected"], m["reward_margin"], m["reward_accuracy"]],
        [0.25, -0.25, 0.5, 1.0],
        atol=1e-6,
    )
    loss, _ = obj.dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    np.testing.assert_allclose(loss, 0.9 * _nls(0.5) + 0.1 * _nls(-0.5), atol=1e-6)
    np.testing.assert_allclose(obj.ipo_loss(*args, beta=0.5)[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(obj.ipo_loss(*args, beta=0.25)[0], 1.0, atol=1e-6)


def test_bradley_terry():
    rc, rr = jnp.array([2.0, 0.0]), jnp.array([1.0, 0.0])
    np.testing.assert_allclose(obj.bradley_terry_loss(rc, rr), (_nls(1) + _nls(0)) / 2, atol=1e-6)
    np.testing.assert_allclose(
        obj.bradley_terry_loss(rc, rr, margin=1.0), (_nls(0) + _nls(-1)) / 2, atol=1e-6
    )
    np.testing.assert_allclose(obj.pairwise_accuracy(rc, rr), 0.75)


def test_plackett_luce():
    s = jnp.array([[1.0, 2.0, 0.0]])
    r = jnp.array([[1, 0, 2]])  # order: idx1 (2.0), idx0 (1.0), idx2 (0.0)
    lse3 = math.log(math.e**2 + math.e + 1)
    lse2 = math.log(math.e + 1)
    want = -(2 - lse3) - (1 - lse2)
    np.testing.assert_allclose(obj.plackett_luce_loss(s, r), want, atol=1e-5)
    # A padding candidate (rank -1) changes nothing.
    s4 = jnp.array([[1.0, 2.0, 0.0, 99.0]])
    r4 = jnp.array([[1, 0, 2, -1]])
    np.testing.assert_allclose(obj.plackett_luce_loss(s4, r4), want, atol=1e-5)
    # K = 2 is Bradley–Terry.
    s2, r2 = jnp.array([[0.3, 1.0]]), jnp.array([[1, 0]])
    np.testing.assert_allclose(
        obj.plackett_luce_loss(s2, r2), obj.bradley_terry_loss(s2[:, 1], s2[:, 0]), atol=1e-6
    )


def test_all_pairs_bradley_terry():
    s = jnp.array([[1.0, 2.0, 0.0, 99.0]])
    r = jnp.array([[1, 0, 2, -1]])
    want = (_nls(1.0) + _nls(2.0) + _nls(1.0)) / 3
    np.testing.assert_allclose(obj.all_pairs_bradley_terry_loss(s, r), want, atol=1e-6)


def test_reward_centering():
    s = jnp.array([[1.0, -3.0], [2.0, 50.0]])
    m = jnp.array([[1, 1], [1, 0]])
    np.testing.assert_allclose(obj.reward_centering_penalty(s, m), (1 + 9 + 4) / 3, atol=1e-6)
