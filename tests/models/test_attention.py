"""Attention backends (fft.models.attention) against the xla reference, and the remat policies.

The Pallas kernels (flash, splash) run in interpret mode on CPU: the same kernel code as on a
GPU/TPU, executed by the interpreter. Tolerance: float32, outputs and gradients within 2e-5
absolute on real (nonzero segment) positions; padding rows are don't-care for every backend.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_testlib import FAMILIES, MICRO, tokens

from fft import sharding
from fft.config_lib import FFTError
from fft.models import attention as A
from fft.models.transformer import Transformer, _remat_policy

ATOL = 2e-5


def _qkv(b, t, n, k, h, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (b, t, n, h)),
        jax.random.normal(keys[1], (b, t, k, h)),
        jax.random.normal(keys[2], (b, t, k, h)),
    )


def _check_against_xla(fn, q, k, v, seg, **kw):
    """fn(q, k, v) forward and d(loss)/d(q, k, v) equal the xla backend's on real positions."""
    real = (seg > 0)[:, :, None, None]
    ref = lambda q, k, v: A.xla_attention(q, k, v, segment_ids=seg, **kw)  # noqa: E731

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)) * real)

    @jax.jit
    def both(q, k, v):
        outs = (ref(q, k, v) * real, fn(q, k, v) * real)
        grads = (jax.grad(loss(ref), (0, 1, 2))(q, k, v), jax.grad(loss(fn), (0, 1, 2))(q, k, v))
        return outs, grads

    (o_ref, o), (g_ref, g) = both(q, k, v)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=ATOL)
    for name, a, b in zip("qkv", g, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, err_msg=f"d{name}")


# Row 0: two packed segments; row 1: left padding (segment 0) then one segment.
def _segments(t, cut=7, pad=5):
    return jnp.array([[1] * cut + [2] * (t - cut), [0] * pad + [1] * (t - pad)], jnp.int32)


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (6, 2.0)])
def test_flash_matches_xla(window, softcap):
    """Pallas flash (interpret): packed rows, GQA 4:2, left padding, window, softcap; T=20 is
    padded to 3 blocks of 8 so the online softmax crosses blocks and the window skips some."""
    q, k, v = _qkv(2, 20, 4, 2, 8)
    seg = _segments(20)
    kw = dict(window=window, softcap=softcap, scale=0.3)

    def fn(q, k, v):
        return A.flash_attention(q, k, v, seg, block=8, **kw)

    _check_against_xla(fn, q, k, v, seg, **kw)


def test_flash_under_mesh_is_shard_mapped():
    """Under a data x fsdp x tensor mesh the kernel runs per shard of rows and heads
    (shard_map) and still equals the reference."""
    q, k, v = _qkv(4, 16, 4, 2, 8)
    seg = jnp.concatenate([_segments(16)] * 2)
    kw = dict(segment_ids=seg, window=5, softcap=0.0, scale=0.3)
    with sharding.use_mesh(sharding.make_mesh(data=2, fsdp=2, tensor=2)):
        fn = jax.jit(lambda q, k, v: A.BACKENDS["flash"](q, k, v, **kw))
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
        out = fn(q, k, v)
    real = (seg > 0)[:, :, None, None]
    ref = A.xla_attention(q, k, v, **kw)
    np.testing.assert_allclose(np.asarray(out * real), np.asarray(ref * real), atol=ATOL)


def test_splash_matches_xla():
    """The TPU splash kernel in interpret mode: packed rows, GQA 4:2, left padding, window."""
    q, k, v = _qkv(2, 128, 4, 2, 8)
    seg = _segments(128, cut=50, pad=30)
    kw = dict(window=40, softcap=0.0, scale=0.3)

    def fn(q, k, v):
        return A.BACKENDS["splash"](q, k, v, segment_ids=seg, **kw)

    _check_against_xla(fn, q, k, v, seg, **kw)


def test_cudnn_backend_uses_lengths_and_falls_back():
    """cudnn (XLA's implementation of the same call on CPU): right-padded single-segment rows
    take the fused path (is_causal + lengths + local window, no mask); packed or left-padded
    rows take the xla fallback; both equal the reference."""
    q, k, v = _qkv(2, 12, 4, 2, 8)
    kw = dict(window=5, softcap=0.0, scale=0.3)
    right = jnp.array([[1] * 12, [1] * 9 + [0] * 3], jnp.int32)
    assert bool(A._single_segment(right)) and not bool(A._single_segment(_segments(12)))
    for seg in (right, _segments(12)):

        def fn(q, k, v, seg=seg):
            return A.BACKENDS["cudnn"](q, k, v, segment_ids=seg, **kw)

        _check_against_xla(fn, q, k, v, seg, **kw)


def test_auto_resolves_by_platform_and_dtype(monkeypatch):
    """auto: xla on CPU; splash on TPU; cudnn on GPU only for 16-bit compute."""
    assert A.resolve("auto", "float32") == "xla"
    assert MICRO.attention == "auto"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert A.resolve("auto", "float32") == "splash"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert A.resolve("auto", "bfloat16") == "cudnn"
    assert A.resolve("auto", "float32") == "xla"
    assert A.resolve("flash", "float32") == "flash"
    assert set(A.NAMES) - {"auto"} == set(A.BACKENDS)


@nnx.jit
def _loss_and_grad(model, toks, seg):
    real = (seg > 0).astype(jnp.float32)

    def loss(m):
        logp = jax.nn.log_softmax(m(toks, None, seg))[..., 3]
        return jnp.sum(logp * real) / jnp.sum(real)

    return nnx.value_and_grad(loss)(model)


def _same_training(model, ref_model, toks, seg, atol):
    loss, grad = _loss_and_grad(model, toks, seg)
    ref_loss, ref_grad = _loss_and_grad(ref_model, toks, seg)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol)


def test_flash_in_model_scan_mixed_windows():
    """model.attention='flash' in gemma2 (softcap, MQA, local/global layers in one lax.scan, so
    the window is chosen by lax.cond) trains like 'xla' on packed + left-padded rows."""
    cfg = FAMILIES["gemma2"].replace(scan_layers=True)
    ref = Transformer(cfg.replace(attention="xla"), rngs=nnx.Rngs(0))
    model = Transformer(cfg.replace(attention="flash"), rngs=nnx.Rngs(0))
    _same_training(model, ref, tokens(cfg), _segments(12), ATOL)


def test_save_qkv_remat_trains_like_none(capsys):
    """remat='save_qkv' keeps the named q/k/v projections and gives none's loss and grads."""
    toks, seg = tokens(MICRO), _segments(12)
    model = Transformer(MICRO.replace(remat="save_qkv"), rngs=nnx.Rngs(0))
    _same_training(model, Transformer(MICRO, rngs=nnx.Rngs(0)), toks, seg, 1e-5)

    block = model.layers[0]
    graphdef, state = nnx.split(block)
    x = jnp.ones((2, 12, MICRO.d_model))
    mask = A.train_mask("xla", seg)
    cos, sin = model._ropes(jnp.broadcast_to(jnp.arange(12), (2, 12)))[0]

    def run(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x, cos, sin, mask)[0])

    remat = jax.checkpoint(run, policy=_remat_policy("save_qkv"))
    jax.ad_checkpoint.print_saved_residuals(remat, state, x)
    saved = capsys.readouterr().out
    for name in ("query_proj", "key_proj", "value_proj"):
        assert f"named '{name}'" in saved, saved


def test_offload_remat_refused_on_cpu():
    """remat='offload' needs pinned host memory (TPU/GPU): a clear FFTError on CPU."""
    with pytest.raises(FFTError, match="pinned host memory"):
        Transformer(MICRO.replace(remat="offload"), rngs=nnx.Rngs(0))
