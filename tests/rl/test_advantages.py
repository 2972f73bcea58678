"""GAE, returns, whitening and group-relative advantages against hand-computed numbers."""

import jax.numpy as jnp
import numpy as np

from fft.rl import advantages as adv


def test_gae_full_mask():
    # delta = (0.1, 0.1, 0.3); A2 = 0.3, A1 = 0.1 + 0.5*0.3, A0 = 0.1 + 0.5*0.25.
    r = jnp.array([[0.0, 0.0, 1.0]])
    v = jnp.array([[0.5, 0.6, 0.7]])
    m = jnp.ones((1, 3))
    a, ret = adv.gae(r, v, m, gamma=1.0, lam=0.5)
    np.testing.assert_allclose(a, [[0.225, 0.25, 0.3]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.725, 0.85, 1.0]], atol=1e-6)


def test_gae_respects_mask():
    # The sequence ends at t=1: V_2 and r_2 are ignored, nothing bootstraps past the end.
    r = jnp.array([[0.0, 1.0, 5.0]])
    v = jnp.array([[0.5, 0.6, 9.0]])
    m = jnp.array([[1.0, 1.0, 0.0]])
    a, ret = adv.gae(r, v, m, gamma=1.0, lam=0.5)
    np.testing.assert_allclose(a, [[0.3, 0.4, 0.0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.8, 1.0, 0.0]], atol=1e-6)


def test_gae_lambda_one_is_discounted_return_minus_value():
    r = jnp.array([[0.0, 0.0, 1.0]])
    v = jnp.array([[0.5, 0.6, 0.7]])
    m = jnp.ones((1, 3))
    a, ret = adv.gae(r, v, m, gamma=0.9, lam=1.0)
    np.testing.assert_allclose(a, [[0.31, 0.3, 0.3]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.81, 0.9, 1.0]], atol=1e-6)
    np.testing.assert_allclose(adv.discounted_returns(r, m, gamma=0.9), ret, atol=1e-6)


def test_whiten_masked():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    m = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(adv.whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(
        adv.whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], atol=1e-6
    )


def test_group_relative():
    s = jnp.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    a = adv.group_relative(s, 4, eps=0.0)
    sd = np.sqrt(0.25 * 0.75)
    np.testing.assert_allclose(
        a, [-1, 1, -1, 1, 0.75 / sd, -0.25 / sd, -0.25 / sd, -0.25 / sd], atol=1e-5
    )
    np.testing.assert_allclose(
        adv.group_relative(s, 4, normalize=False), [-0.5, 0.5, -0.5, 0.5, 0.75, -0.25, -0.25, -0.25]
    )
    # All-equal group: zero advantage, not NaN.
    np.testing.assert_allclose(adv.group_relative(jnp.ones(4), 4), np.zeros(4))


def test_terminal_rewards():
    m = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = adv.terminal_rewards(jnp.array([2.0, 3.0, 4.0]), m)
    np.testing.assert_allclose(out, [[0, 2, 0], [3, 0, 0], [0, 0, 0]])
