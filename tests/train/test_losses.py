"""Losses against hand-computed values; the chunked loss equals the plain one (value and grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fft.train import losses


def _lsm(z):
    z = np.asarray(z, np.float64)
    return (
        z
        - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - z.max(-1, keepdims=True)
    )


def test_next_token_loss_by_hand():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    batch = {"tokens": np.array([[2, 0, 1]]), "loss_mask": np.array([[0.0, 1.0, 1.0]])}
    # token 1 (=0) predicted from position 0 (p=0.5); token 2 (=1) from position 1 (p=0.8)
    want = -(np.log(0.5) + np.log(0.8)) / 2
    got = losses.next_token_loss(jnp.asarray(logits, jnp.float32), batch)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # mask 0 on the last target drops it
    batch["loss_mask"] = np.array([[0.0, 1.0, 0.0]])
    np.testing.assert_allclose(losses.next_token_loss(logits, batch), -np.log(0.5), rtol=1e-6)


def test_token_logprobs_alignment():
    r = np.random.default_rng(0)
    logits = r.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = r.integers(0, 7, (2, 5))
    lp = np.asarray(losses.token_logprobs(logits, tokens))
    ref = _lsm(logits)
    assert lp.shape == (2, 5) and np.all(lp[:, 0] == 0)
    for t in range(1, 5):
        np.testing.assert_allclose(lp[:, t], ref[np.arange(2), t - 1, tokens[:, t]], rtol=1e-5)
    batch = {"tokens": tokens, "loss_mask": np.ones((2, 5), np.float32)}
    np.testing.assert_allclose(-lp[:, 1:].mean(), losses.next_token_loss(logits, batch), rtol=1e-5)


def test_classification_multilabel_z_kl():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], np.float32)
    labels = np.array([0, 2])
    ref = _lsm(logits)
    want = -(ref[0, 0] + ref[1, 2]) / 2
    np.testing.assert_allclose(losses.classification_loss(logits, labels), want, rtol=1e-6)
    eps = 0.1
    q = np.eye(3)[labels] * (1 - eps) + eps / 3
    np.testing.assert_allclose(
        losses.classification_loss(logits, labels, label_smoothing=eps),
        -(q * ref).sum(-1).mean(),
        rtol=1e-6,
    )
    y = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    want = -(y * np.log(s) + (1 - y) * np.log(1 - s)).mean()
    np.testing.assert_allclose(losses.multilabel_loss(logits, y), want, rtol=1e-6)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(losses.z_loss(logits), (lse**2).mean(), rtol=1e-6)
    np.testing.assert_allclose(losses.z_loss(logits, np.array([1, 0])), lse[0] ** 2, rtol=1e-6)
    p, qq = _lsm(logits[0]), _lsm(logits[1])
    np.testing.assert_allclose(
        losses.kl_divergence(logits[:1], logits[1:]), (np.exp(p) * (p - qq)).sum(), rtol=1e-5
    )
    np.testing.assert_allclose(losses.kl_divergence(logits, logits), 0.0, atol=1e-7)


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_chunked_equals_plain(chunk):
    r = np.random.default_rng(1)
    b, t, d, v = 2, 9, 6, 11
    h = jnp.asarray(r.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(r.normal(size=(d, v)), jnp.float32)
    mask = (r.random((b, t)) > 0.3).astype(np.float32)
    mask[:, 0] = 0
    batch = {"tokens": r.integers(0, v, (b, t)), "loss_mask": mask}

    def plain(h, w):
        return losses.next_token_loss(jnp.einsum("btd,dv->btv", h, w), batch, z_loss_weight=1e-2)

    def chunked(h, w):
        return losses.chunked_next_token_loss(h, w, batch, chunk=chunk, z_loss_weight=1e-2)

    def chunked_fn(h, w):  # callable unembedding, as with model.logits
        return losses.chunked_next_token_loss(
            h, lambda x: jnp.einsum("bcd,dv->bcv", x, w), batch, chunk=chunk, z_loss_weight=1e-2
        )

    lp, gp = jax.value_and_grad(plain, argnums=(0, 1))(h, w)
    for fn in (chunked, chunked_fn):
        lc, gc = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(h, w)
        np.testing.assert_allclose(lc, lp, rtol=1e-6)
        for a, b_ in zip(gc, gp, strict=True):
            np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-7)


def test_empty_mask_is_zero_not_nan():
    logits = jnp.zeros((1, 3, 4))
    batch = {"tokens": np.zeros((1, 3), np.int32), "loss_mask": np.zeros((1, 3))}
    assert float(losses.next_token_loss(logits, batch)) == 0.0
