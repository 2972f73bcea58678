"""The CPU decode kernels equal XLA's own computation, are really used by generate, and fall
back cleanly when they cannot be built."""

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fft import sampling as gen
from fft import sharding
from fft.kernels import cpu
from fft.models import layers as L
from fft.models.presets import get_preset
from fft.models.transformer import Transformer

needs_kernels = pytest.mark.skipif(
    not cpu.available(),
    reason="CPU kernels unavailable here (not x86-64 with AVX2/FMA, or no C++ compiler)",
)


def test_built_where_a_compiler_and_avx2_exist():
    # On the machines this project runs CI on (x86-64 with AVX2 and g++), the kernels must
    # really be built: a silent fallback there would hide a broken build.
    if platform.machine() == "x86_64" and {"avx2", "fma"} <= cpu._cpu_flags():
        assert cpu.available()


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 4, 7, 8, 13, 32])
@pytest.mark.parametrize("i,o", [(64, 16), (48, 96), (384, 1024)])
def test_small_matmul_equals_dot(m, i, o):
    rng = np.random.default_rng(m + i + o)
    x = rng.standard_normal((m, i), np.float32)
    w = rng.standard_normal((i, o), np.float32)
    packed = jax.jit(cpu.pack)(w)
    np.testing.assert_array_equal(packed, w.reshape(i, o // 16, 16).transpose(1, 0, 2))
    y = jax.jit(cpu.small_matmul)(x, packed)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


def _reference_attention(q, k, v, bias):
    s = jnp.einsum("bkgd,bksd->bkgs", q, k) + bias[:, None, None, :]
    return jnp.einsum("bkgs,bksd->bkgd", jax.nn.softmax(s, axis=-1), v)


@needs_kernels
@pytest.mark.parametrize("g,index", [(1, 0), (2, 9), (3, 23)])
def test_decode_attention_equals_softmax_over_the_cache(g, index):
    b, nk, s, d = 3, 2, 24, 16
    rng = np.random.default_rng(index)
    q = rng.standard_normal((b, nk, g, d), np.float32)
    k = rng.standard_normal((b, nk, s, d), np.float32)
    v = rng.standard_normal((b, nk, s, d), np.float32)
    # Filled slots 0..index, left padding on row 1, nothing valid after index (empty slots).
    valid = np.arange(s)[None, :] <= index
    valid = np.repeat(valid, b, axis=0)
    valid[1, : index // 2] = False
    valid[:, index] = True  # the query's own slot
    bias = np.where(valid, 0.0, L.NEG_INF).astype(np.float32)

    def kernel(q, k, v, bias, index):
        with cpu.decode_weights(()):
            return cpu.decode_attention(q, k, v, bias, index)

    out = jax.jit(kernel)(q, k, v, bias, index)
    np.testing.assert_allclose(out, _reference_attention(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_decode_attention_declines_outside_a_decode_trace_or_for_other_dtypes():
    q = jnp.zeros((1, 1, 1, 16))
    k = v = jnp.zeros((1, 1, 4, 16))
    assert cpu.decode_attention(q, k, v, jnp.zeros((1, 4)), 0) is None  # not inside decode
    with cpu.decode_weights(()):
        bf16 = q.astype(jnp.bfloat16)
        assert cpu.decode_attention(bf16, k, v, jnp.zeros((1, 4)), 0) is None


def _generate_hlo(model, tokens, mask):
    graphdef, state = nnx.split(model)
    args = (graphdef, state, tokens, mask, jax.random.key(0), 1e-6, 1.0, gen._stop_array([]))
    kw = dict(max_new_tokens=4, greedy=True, top_k=0, nucleus=False)
    fresh = lambda *a, **k: gen._generate_impl(*a, **k)  # noqa: E731 - a new trace each time
    return jax.jit(fresh, static_argnames=gen._STATIC).lower(*args, **kw).as_text()


@needs_kernels
def test_generate_uses_the_kernels_and_matches_xla(monkeypatch):
    cfg = get_preset("micro")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens, mask = gen.left_pad([[5, 9, 17, 3, 44], [8, 2], [100, 200, 300]], pad_id=0)
    hlo = _generate_hlo(model, tokens, mask)
    assert "fft_cpu_small_matmul" in hlo and "fft_cpu_decode_attention" in hlo
    fast = gen.generate_tokens(model, tokens, mask, max_new_tokens=12)

    monkeypatch.setattr(gen, "_kernels_ok", lambda: False)
    hlo = _generate_hlo(model, tokens, mask)
    assert "fft_cpu_small_matmul" not in hlo and "fft_cpu_decode_attention" not in hlo
    # A new static value forces a retrace without the kernels (the cache key ignores the patch).
    slow = gen.generate_tokens(model, tokens, mask, max_new_tokens=12, top_k=cfg.vocab_size)
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_allclose(fast.logprobs, slow.logprobs, atol=1e-4)


@needs_kernels
def test_no_kernels_under_a_mesh():
    # Under a mesh the weights are sharded; the kernels read whole weights, so XLA's dots stay.
    with sharding.use_mesh(sharding.make_mesh(data=len(jax.devices()))):
        assert not gen._kernels_ok()
    with sharding.use_mesh(sharding.make_mesh(data=1, devices=jax.devices()[:1])):
        assert gen._kernels_ok()  # the training loop's mesh on a single CPU
    assert gen._kernels_ok()


def test_build_failure_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="failed"):
        cpu._build(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    monkeypatch.setenv("FFT_CPU_KERNELS", "0")
    assert cpu.available.__wrapped__() is False
