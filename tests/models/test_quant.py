"""QLoRA storage (fft/models/quant.py): int8 / nf4 codes against hand-computed values, error
bounds, the quantized Linear, loading a full-precision source into sharded codes, merging, and
the precision options (`auto` dtypes, quant without LoRA refused)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fft import config_lib, pretrained, sharding
from fft.models import lora, presets, quant
from fft.models.layers import Linear
from fft.models.transformer import Transformer
from fft.train import lm
from fft.train.state import count_model_params, split_model, trainable_filter_from_config

# One block of 4 inputs (rows) for 2 outputs (columns); column 1 is column 0 times 2.
W = np.array([[0.5, 1.0], [-1.0, -2.0], [0.25, 0.5], [0.1, 0.2]], np.float32)


def test_int8_hand_computed():
    q, scale = quant.quantize(W, "int8", n_out=1, block=4)
    # code = round(w / absmax * 127): 63.5 -> 64 (half to even), -127, 31.75 -> 32, 12.7 -> 13
    np.testing.assert_array_equal(q[:, 0], [64, -127, 32, 13])
    np.testing.assert_array_equal(q[:, 1], [64, -127, 32, 13])
    np.testing.assert_allclose(scale, [[1.0, 2.0]])
    w = quant.dequantize(q, scale)
    np.testing.assert_allclose(w[:, 0], [64 / 127, -1.0, 32 / 127, 13 / 127], rtol=1e-6)
    assert np.abs(w - W).max() <= 2.0 / 254 + 1e-7  # absmax / 254 of the larger block


def test_nf4_hand_computed():
    q, scale = quant.quantize(W, "nf4", n_out=1, block=4)
    # w / absmax = 0.5 -> 0.4407 (code 12: 0.5 is below the 0.5017 midpoint to 0.5626),
    # -1 -> code 0, 0.25 -> 0.2461 (code 10), 0.1 -> 0.0796 (code 8: below the 0.1203 midpoint).
    codes = np.array([12, 0, 10, 8], np.uint8)
    # Two columns pack into one byte: column 0 in the low nibble, column 1 in the high one.
    assert q.dtype == np.uint8 and q.shape == (4, 1)
    np.testing.assert_array_equal(q[:, 0], codes | (codes << 4))
    w = quant.dequantize(q, scale)
    np.testing.assert_allclose(w[:, 0], quant.NF4[codes], rtol=1e-6)
    np.testing.assert_allclose(w[:, 1], 2 * quant.NF4[codes], rtol=1e-6)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize(
    "shape,n_out,block",
    [((256, 32), 1, 64), ((4, 16, 64), 1, 64), ((128, 4, 16), 2, 64), ((3, 128, 8), 1, 32)],
)
def test_error_bound_and_host_equals_device(kind, shape, n_out, block):
    """|w - dq(q(w))| <= max_error * absmax of the weight's block, for plain, multi-input
    (`o`), multi-output (`q`) and stacked kernels; numpy (loaders) == jax (init) codes."""
    w = np.random.RandomState(0).standard_t(3, shape).astype(np.float32)  # heavy tails
    q, scale = quant.quantize(w, kind, n_out, block)
    err = np.abs(quant.dequantize(q, scale) - w)
    axis = len(shape) - n_out - 1
    bs = quant.block_for(shape[axis], block)
    bound = np.repeat(scale, bs, axis=axis) * quant.CODECS[kind].max_error
    assert (err <= bound * (1 + 1e-6)).all()
    qj, sj = quant.quantize(jnp.asarray(w), kind, n_out, block)
    np.testing.assert_array_equal(np.asarray(qj), q)
    np.testing.assert_allclose(np.asarray(sj), scale)
    assert quant.storage_bytes(shape, kind, block, n_out) == q.nbytes + scale.nbytes


def test_quantized_linear_is_the_dequantized_matmul_and_frozen():
    lin = Linear((64,), (4, 16), names=("embed", "heads", "head_dim"), quant="nf4",
                 rngs=nnx.Rngs(0))  # fmt: skip
    assert not hasattr(lin, "kernel")
    assert isinstance(lin.kernel_q, quant.QuantWeight) and lin.kernel_q[...].shape == (64, 4, 8)
    x = jax.random.normal(jax.random.key(1), (2, 3, 64))
    want = jnp.tensordot(x, lin.weight(jnp.float32), 1)
    np.testing.assert_allclose(lin(x), want, atol=1e-6)
    # No trainable filter selects the codes, even one naming them.
    for regex, rank in ((".*", 0), ("kernel", 4)):
        _, params, frozen = split_model(lin, trainable_filter_from_config(regex, rank))
        names = {p[-1] for p, _ in nnx.to_flat_state(params)}
        assert not names & {"kernel_q", "kernel_scale"}


def _micro(**kw):
    return presets.get_preset("micro").replace(**kw)


@pytest.mark.parametrize("scan", [False, True])
def test_place_quantizes_a_full_precision_source_into_sharded_codes(scan):
    """The load path: an f32 checkpoint fills a QLoRA model's codes and scales, each placed
    straight into its sharding (fsdp x tensor over the 8 fake devices)."""
    src_model = Transformer(_micro(), rngs=nnx.Rngs(0))
    flat = {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(src_model, nnx.Param))
    }
    cfg = _micro(quant="nf4", scan_layers=scan)
    abstract = nnx.eval_shape(
        lambda: lora.apply_lora(Transformer(cfg, rngs=nnx.Rngs(5)), 4, 8.0, rngs=nnx.Rngs(1))
    )
    state = nnx.state(abstract)
    mesh = sharding.make_mesh(2, 2, 2)
    shardings = sharding.state_shardings(state, mesh)
    loaded = pretrained.place(flat, state, shardings, model_config=_micro())
    got = dict(nnx.to_flat_state(loaded))
    q_path = ("layers", "attn", "q", "kernel_q") if scan else ("layers", 0, "attn", "q", "kernel_q")
    q = got[q_path].get_value()
    assert q.dtype == np.uint8 and len(q.sharding.device_set) == 8
    kernel = flat["layers.0.attn.q.kernel"]
    want_q, want_s = quant.quantize(kernel, "nf4", 2, 64)
    scale = got[(*q_path[:-1], "kernel_scale")].get_value()
    np.testing.assert_array_equal(np.asarray(q)[0] if scan else np.asarray(q), want_q)
    np.testing.assert_allclose(np.asarray(scale)[0] if scan else np.asarray(scale), want_s)
    # Its logits are those of the f32 model with every block kernel replaced by dq(q(kernel)).
    model = lora.apply_lora(Transformer(cfg, rngs=nnx.Rngs(5)), 4, 8.0, rngs=nnx.Rngs(1))
    nnx.update(model, loaded)
    for p, v in nnx.to_flat_state(nnx.state(src_model, nnx.Param)):
        if p[0] == "layers" and p[-1] == "kernel":
            n_out = 2 if p[-2] in ("q", "k", "v") else 1
            w = np.asarray(v.get_value())
            v.set_value(jnp.asarray(quant.dequantize(*quant.quantize(w, "nf4", n_out, 64))))
    tok = jnp.arange(16).reshape(2, 8)
    np.testing.assert_allclose(np.asarray(model(tok)), np.asarray(src_model(tok)), atol=1e-5)


def test_merge_lora_dequantizes_into_param_dtype():
    model = Transformer(_micro(quant="int8", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    lora.apply_lora(model, 4, 8.0, rngs=nnx.Rngs(1))
    q = model.layers[0].attn.q
    q.lora_b[...] = jax.random.normal(jax.random.key(2), q.lora_b[...].shape) * 0.05
    tok = jnp.arange(16).reshape(2, 8)
    before = np.asarray(model(tok))
    lora.merge_lora(model)
    assert not q.quant and q.kernel[...].dtype == jnp.bfloat16 and not hasattr(q, "kernel_q")
    np.testing.assert_allclose(np.asarray(model(tok)), before, atol=0.05)  # the bf16 fold


def test_count_model_params_counts_quantized_weights():
    full = nnx.state(Transformer(_micro(), rngs=nnx.Rngs(0)))
    for kind in ("int8", "nf4"):
        q = nnx.state(Transformer(_micro(quant=kind), rngs=nnx.Rngs(0)))
        assert count_model_params(q) == count_model_params(full)


def _run_config(**model):
    c = config_lib.base_config()
    c.method = "instruction"
    for k, v in model.items():
        c.model[k] = v
    return c


def test_quant_without_lora_is_refused():
    c = _run_config(quant="nf4")
    with pytest.raises(config_lib.ConfigError, match="lora.rank"):
        config_lib.validate(c)
    c.lora.rank = 8
    config_lib.validate(c)


def test_auto_dtypes_by_platform():
    c = _run_config(dtype="auto", param_dtype="auto")
    assert lm.resolve_dtypes(c, "cpu") == ("float32", "float32")
    assert lm.resolve_dtypes(c, "tpu") == ("bfloat16", "float32")  # full FT keeps f32 weights
    c.lora.rank = 8
    assert lm.resolve_dtypes(c, "gpu") == ("bfloat16", "bfloat16")  # frozen base in bf16
    assert lm.resolve_dtypes(c, "cpu") == ("float32", "float32")
    mc = lm.runtime_options(presets.get_preset("micro"), c, "tpu")
    assert (mc.dtype, mc.param_dtype) == ("bfloat16", "bfloat16")


def test_bf16_base_keeps_f32_adapters_and_f32_logits():
    """Item 2: a bf16 model's LoRA adapters (hence their Adam moments) and logits are f32."""
    c = config_lib.base_config()
    c.lora = ml_collections.ConfigDict(dict(c.lora))
    c.lora.rank = 4
    cfg = _micro(dtype="bfloat16", param_dtype="bfloat16")
    model = lm.model_builder(cfg, c)()
    assert model.layers[0].attn.q.kernel[...].dtype == jnp.bfloat16
    lora_state = nnx.state(model, lora.LoRAParam)
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(lora_state)} == {jnp.dtype("float32")}
    assert model(jnp.arange(8).reshape(1, 8)).dtype == jnp.float32
