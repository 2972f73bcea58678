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


def _step_outputs(model, steps):
    """The loss the train step sees at each of `steps` (same weights), via its aux."""
    import optax

    from fft.train.state import TrainState, split_model
    from fft.train.step import make_train_step

    tokens = _tokens()
    graphdef, params, frozen = split_model(model, lora.lora_filter)
    tx = optax.sgd(0.0)

    def loss_fn(m, batch, rng):
        out = m(batch["tokens"]).astype(jnp.float32)
        return out.mean(), {"out": out.mean()}

    step = jax.jit(make_train_step(graphdef, loss_fn, tx))
    state = TrainState(jnp.zeros((), jnp.int32), params, frozen, tx.init(params), jax.random.key(0))
    return [float(step(state.replace(step=jnp.int32(s)), {"tokens": tokens})[1]["out"])
            for s in steps]  # fmt: skip


def test_dropout_fresh_masks_per_step_and_off_outside_the_step():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    tokens = _tokens()
    lora.apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1), dropout=0.5)
    _randomize_b(model)
    # Outside the train step (evals, generation, rollouts) there is no dropout: the output is
    # the exact output of the same weights without dropout, and repeatable.
    plain = Transformer(CFG, rngs=nnx.Rngs(0))
    lora.apply_lora(plain, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    nnx.update(plain, nnx.state(model, lora.lora_filter))
    np.testing.assert_array_equal(
        np.asarray(forward(model, tokens)), np.asarray(forward(plain, tokens))
    )
    # Inside it: a new mask every step (the counter used to live in state the step never wrote
    # back, so every step drew the same masks), the same mask for the same step.
    a, b, a2 = _step_outputs(model, [0, 1, 0])
    no_drop = float(forward(plain, tokens).astype(jnp.float32).mean())
    assert a != b and a == a2 and no_drop not in (a, b)


def test_adapters_stay_f32_on_a_bf16_base():
    model = Transformer(CFG.replace(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    lora.apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    leaves = jax.tree.leaves(nnx.state(model, lora.lora_filter))
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
    assert (
        nnx.state(model, nnx.Param)["layers"][0]["attn"]["q"]["kernel"][...].dtype == jnp.bfloat16
    )
    import optax

    opt = optax.adamw(1e-3).init(nnx.state(model, lora.lora_filter))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(opt) if x.ndim)
