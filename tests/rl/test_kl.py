"""KL estimators and controllers against hand-computed numbers."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from fft.rl import kl


def test_estimators():
    lp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
    d = math.log(2.0)
    np.testing.assert_allclose(kl.kl_penalty(lp, ref, "k1"), [d], atol=1e-6)
    np.testing.assert_allclose(kl.kl_penalty(lp, ref, "k2"), [d * d / 2], atol=1e-6)
    np.testing.assert_allclose(kl.kl_penalty(lp, ref, "k3"), [0.5 - 1 + d], atol=1e-6)
    with pytest.raises(ValueError):
        kl.kl_penalty(lp, ref, "k4")


def test_k1_k3_unbiased_on_a_known_pair():
    # Exact expectation over p = (0.5, 0.5) against q = (0.25, 0.75): E_p[k1] = E_p[k3] = KL(p||q).
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    true_kl = float(np.sum(p * np.log(p / q)))
    lp, lq = jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q))
    np.testing.assert_allclose(float(jnp.sum(p * kl.kl_k1(lp, lq))), true_kl, atol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(p * kl.kl_k3(lp, lq))), true_kl, atol=1e-6)


def test_fixed_controller():
    c = kl.make_controller("fixed", 0.1)
    c.update(100.0, 64)
    assert c.value == 0.1


def test_adaptive_controller():
    c = kl.make_controller("adaptive", 0.1, target=6.0, horizon=10000)
    c.update(12.0, 100)  # error clipped to +0.2
    np.testing.assert_allclose(c.value, 0.1 * (1 + 0.2 * 100 / 10000))
    c.set_state({"value": 0.1})
    c.update(3.0, 100)  # error clipped to -0.2
    np.testing.assert_allclose(c.value, 0.1 * (1 - 0.2 * 100 / 10000))
    c.set_state({"value": 0.1})
    c.update(6.6, 100)  # error 0.1
    np.testing.assert_allclose(c.value, 0.1 * (1 + 0.1 * 100 / 10000))
    assert c.get_state() == {"value": c.value}
