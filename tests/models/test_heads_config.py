"""Heads, ModelConfig and presets."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_testlib import FAMILIES

from fft.config_lib import FFTError
from fft.models import heads
from fft.models.config import ModelConfig
from fft.models.presets import PRESETS, get_preset
from fft.models.transformer import Transformer, count_params


def test_pooling_left_and_right_padding():
    h = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    mask = jnp.array([[0, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(heads.pool(h, mask > 0, "cls"), h[jnp.arange(2), jnp.array([1, 0])])
    np.testing.assert_allclose(heads.pool(h, mask > 0, "last"), h[jnp.arange(2), jnp.array([2, 3])])
    np.testing.assert_allclose(heads.pool(h, mask > 0, "mean")[0], h[0, 1:3].mean(0))


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_sequence_classifier(pooling):
    cfg = FAMILIES["llama"]
    model = heads.SequenceClassifier(
        Transformer(cfg, rngs=nnx.Rngs(0)),
        heads.ClassificationHead(cfg.d_model, 3, pooling, rngs=nnx.Rngs(1)),
    )
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 3, cfg.vocab_size)
    seg = jnp.array([[1, 1, 1, 1, 0, 0], [1] * 6])
    call = nnx.jit(lambda m, t, s: m(t, segment_ids=s))
    out = call(model, tokens, seg)
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    # Padding content does not change the output.
    out2 = call(model, tokens.at[0, 4:].set(7), seg)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out2), atol=1e-5)
    paths = {p[0] for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert paths == {"backbone", "head"}


def test_value_and_scalar_heads():
    h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    v = heads.ValueHead(8, rngs=nnx.Rngs(0))(h)
    assert v.shape == (2, 5) and float(jnp.abs(v).max()) == 0.0
    r = heads.ScalarHead(8, rngs=nnx.Rngs(0))
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = r(h, mask)
    assert out.shape == (2,)
    np.testing.assert_allclose(out[1], r(h[1:2, :3])[0], atol=1e-6)


def test_config_roundtrip_and_errors():
    cfg = FAMILIES["gemma2"].replace(rope_scaling={"rope_type": "linear", "factor": 2.0})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(d) == cfg and hash(ModelConfig.from_dict(d)) == hash(cfg)
    with pytest.raises(FFTError, match="bogus"):
        ModelConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(FFTError, match="norm"):
        cfg.replace(norm="batch")
    with pytest.raises(FFTError, match="n_kv_heads"):
        cfg.replace(n_heads=4, n_kv_heads=3)
    with pytest.raises(FFTError, match="preset"):
        get_preset("huge")
    assert [cfg.is_local_layer(i) for i in range(4)] == [True, False, True, False]


def test_presets():
    assert set(PRESETS) >= {"micro", "tiny", "20m", "100m", "1b", "7b"}
    assert get_preset("fft:tiny") == PRESETS["tiny"]
    m = PRESETS["micro"]
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff) == (
        512, 64, 2, 4, 2, 128,
    )  # fmt: skip
    shapes = nnx.eval_shape(lambda: Transformer(PRESETS["20m"], rngs=nnx.Rngs(0)))
    assert count_params(shapes) == 20_453_760
    seven = nnx.eval_shape(lambda: Transformer(PRESETS["7b"], rngs=nnx.Rngs(0)))
    assert count_params(seven) == 6_738_415_616  # Llama-2-7B
