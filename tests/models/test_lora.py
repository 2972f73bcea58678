"""LoRA: zero-init identity, merge equivalence, filter, disable, stacked layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_testlib import FAMILIES, forward

from fft.config_lib import FFTError
from fft.models import lora
from fft.models.transformer import Transformer

CFG = FAMILIES["llama"]


def _tokens(b=2, t=10):
    return jax.random.randint(jax.random.key(0), (b, t), 3, CFG.vocab_size, jnp.int32)


@nnx.jit
def _base(model, tokens):
    with lora.disable_lora(model):
        return model(tokens)


def _randomize_b(model, seed=3):
    leaves = nnx.to_pure_dict(nnx.state(model, lora.lora_filter))

    @jax.jit  # one compile instead of an eager op per distinct shape
    def noise(leaves):
        flat, tree = jax.tree.flatten(leaves)
        keys = jax.random.split(jax.random.key(seed), len(flat))
        return tree.unflatten(
            [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, flat, strict=True)]
        )

    nnx.update(model, noise(leaves))


@pytest.mark.parametrize("scan", [False, True])
def test_zero_init_then_merge(scan):
    cfg = CFG.replace(scan_layers=scan)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens()
    base = forward(model, tokens)
    lora.apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(np.asarray(forward(model, tokens)), np.asarray(base), atol=1e-5)

    _randomize_b(model)
    adapted = forward(model, tokens)
    assert float(jnp.abs(adapted - base).max()) > 1e-3
    if not scan:  # (one compile fewer for the slow stacked variant)
        np.testing.assert_allclose(np.asarray(_base(model, tokens)), np.asarray(base), atol=1e-5)
    np.testing.assert_allclose(np.asarray(forward(model, tokens)), np.asarray(adapted), atol=1e-5)

    lora.merge_lora(model)
    assert not lora.has_lora(model)
    assert not jax.tree.leaves(nnx.state(model, lora.lora_filter))
    np.testing.assert_allclose(np.asarray(forward(model, tokens)), np.asarray(adapted), atol=1e-5)


def test_filter_selects_only_lora_params():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    flat = nnx.to_flat_state(nnx.state(model, lora.lora_filter))
    paths = [".".join(map(str, p)) for p, _ in flat]
    assert all(isinstance(v, lora.LoRAParam) for _, v in flat)
    # 7 targets x 2 layers x (a, b)
    assert len(paths) == 7 * CFG.n_layers * 2
    assert "layers.0.attn.q.lora_a" in paths and "layers.1.mlp.down.lora_b" in paths
    a = dict(flat)[("layers", 0, "attn", "q", "lora_a")]
    assert a.shape == (CFG.d_model, 2)
    b = dict(flat)[("layers", 0, "attn", "q", "lora_b")]
    assert b.shape == (2, CFG.n_heads, CFG.head_dim)
    assert b.get_metadata()["out_sharding"] == (None, "heads", "head_dim")
    rest = nnx.state(model, nnx.All(nnx.Param, nnx.Not(lora.lora_filter)))
    assert not any(isinstance(v, lora.LoRAParam) for _, v in nnx.to_flat_state(rest))


def test_targets_regex_and_all():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    found = [p for p, _ in lora.lora_modules(model, r"attn\.(q|v)$")]
    assert found == ["layers.0.attn.q", "layers.0.attn.v", "layers.1.attn.q", "layers.1.attn.v"]
    assert "lm_head" not in [p for p, _ in lora.lora_modules(model, "all")]
    with pytest.raises(FFTError):
        lora.apply_lora(model, rank=2, alpha=1.0, targets=("nope",), rngs=nnx.Rngs(0))


def test_disable_inside_jit_and_rslora_scale():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    lora.apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1), rslora=True)
    assert model.layers[0].attn.q.lora_scale == pytest.approx(8.0 / 2.0)
    _randomize_b(model)
    graphdef, state = nnx.split(model)
    tokens = _tokens()

    @jax.jit
    def both(state, tokens):
        m = nnx.merge(graphdef, state)
        with lora.disable_lora(m):
            ref = m(tokens)
        return m(tokens), ref

    policy, ref = both(state, tokens)
    base = forward(Transformer(CFG, rngs=nnx.Rngs(0)), tokens)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(base), atol=1e-5)
    assert float(jnp.abs(policy - ref).max()) > 1e-3


def test_grad_only_through_lora():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    lora.apply_lora(model, rank=2, alpha=2.0, rngs=nnx.Rngs(1))
    tokens = _tokens()
    diff = nnx.DiffState(0, lora.lora_filter)
    grads = nnx.grad(lambda m: forward(m, tokens)[..., 5].mean(), argnums=diff)(model)
    leaves = nnx.to_flat_state(grads)
    assert leaves and all(isinstance(v, lora.LoRAParam) for _, v in leaves)
    # B starts at zero, so only B gets a nonzero gradient at the first step.
    g_b = dict(leaves)[("layers", 0, "attn", "q", "lora_b")]
    assert float(jnp.abs(g_b[...]).max()) > 0
