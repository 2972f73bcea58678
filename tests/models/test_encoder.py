"""The BERT-style encoder: shapes, param tree + logical axes, masking, pooling, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fft  # noqa: F401
from fft.config_lib import FFTError
from fft.models.encoder import Encoder, EncoderConfig, attention_allowed, mean_pool

CFG = EncoderConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, head_dim=8, d_ff=64,
                    max_seq_len=16)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return Encoder(CFG, rngs=nnx.Rngs(0))


def test_shapes_and_alias(model):
    tok = jnp.arange(20, dtype=jnp.int32).reshape(2, 10)
    h = model(tok)
    assert h.shape == (2, 10, 32) and h.dtype == jnp.float32
    np.testing.assert_array_equal(h, model.hidden_states(tok))


def test_param_tree_and_axes(model):
    specs = {
        ".".join(map(str, p)): v.get_metadata().get("out_sharding")
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    assert specs["embed.embedding"] == ("vocab", "embed")
    assert specs["layers.0.attn.q.kernel"] == ("embed", "heads", "head_dim")
    assert specs["layers.0.attn.q.bias"] == ("heads", "head_dim")
    assert specs["layers.1.attn.o.kernel"] == ("heads", "head_dim", "embed")
    assert specs["layers.1.mlp.up.kernel"] == ("embed", "mlp")
    assert specs["layers.1.mlp.down.kernel"] == ("mlp", "embed")
    assert specs["layers.0.attn_norm.scale"] == ("norm",)
    assert {"type_embed.embedding", "pos_embed.embedding", "embed_norm.bias"} <= set(specs)


def test_padding_does_not_change_real_tokens(model):
    tok = jnp.asarray([[5, 6, 7, 8, 0, 0]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0]], jnp.int32)
    full = model(tok, attention_mask=mask)
    short = model(tok[:, :4])
    np.testing.assert_allclose(full[:, :4], short, atol=1e-5)


def test_packed_segments_are_independent(model):
    a, b = [5, 6, 7], [9, 10, 11, 12]
    packed = jnp.asarray([a + b], jnp.int32)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2]], jnp.int32)
    pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3]], jnp.int32)
    h = model(packed, attention_mask=seg, positions=pos)
    np.testing.assert_allclose(h[:, :3], model(jnp.asarray([a])), atol=1e-5)
    np.testing.assert_allclose(h[:, 3:], model(jnp.asarray([b])), atol=1e-5)


def test_attention_allowed_pad_rows():
    allowed = attention_allowed(jnp.asarray([[1, 1, 0]]))
    np.testing.assert_array_equal(allowed[0], [[1, 1, 0], [1, 1, 0], [1, 1, 0]])


def test_mean_pool():
    h = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 4)
    pooled = mean_pool(h, jnp.asarray([[1, 1, 0]]))
    np.testing.assert_allclose(pooled, [[2.0, 3.0, 4.0, 5.0]])
    assert np.all(np.isfinite(mean_pool(h, jnp.zeros((1, 3)))))


def test_jit_and_grad(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss(state, tok):
        return jnp.mean(nnx.merge(graphdef, state)(tok) ** 2)

    g = jax.grad(loss)(state, jnp.ones((1, 4), jnp.int32))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))


def test_config_round_trip_and_errors():
    assert EncoderConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(FFTError, match="bogus"):
        EncoderConfig.from_dict({**CFG.to_dict(), "bogus": 1})
    with pytest.raises(FFTError, match="act"):
        EncoderConfig(act="tanh")
    with pytest.raises(FFTError, match="max_seq_len"):
        Encoder(CFG, rngs=nnx.Rngs(0))(jnp.zeros((1, 17), jnp.int32))
