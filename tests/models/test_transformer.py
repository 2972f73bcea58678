"""Decoder forward, packing isolation, KV-cache decode, scan/remat equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fft.models.layers import rope_inv_freq
from fft.models.transformer import Transformer

B, T = 2, 12


def _tokens(cfg, b=B, t=T, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 3, cfg.vocab_size, jnp.int32)


def _randomize_norms(model, seed=1):
    """Random norm scales/biases, so that norm offsets and biases are actually exercised."""
    state = nnx.state(model, nnx.Param)
    key = jax.random.key(seed)

    def f(path, x):
        names = [str(getattr(p, "key", p)) for p in path]
        if any("norm" in n for n in names) or names[-1] == "bias":
            return x + 0.1 * jax.random.normal(
                jax.random.fold_in(key, hash(tuple(names)) % 2**31), x.shape
            )
        return x

    nnx.update(model, jax.tree_util.tree_map_with_path(f, nnx.to_pure_dict(state)))
    return model


def _model(cfg, seed=0):
    return _randomize_norms(Transformer(cfg, rngs=nnx.Rngs(seed)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(family_cfg, dtype):
    cfg = family_cfg.replace(dtype=dtype)
    model = _model(cfg)
    tokens = _tokens(cfg)
    logits = model(tokens)
    assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == jnp.float32
    hidden = model.hidden_states(tokens)
    assert hidden.shape == (B, T, cfg.d_model) and hidden.dtype == jnp.dtype(dtype)
    assert np.isfinite(np.asarray(logits)).all()
    params = nnx.state(model, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    if cfg.logit_softcap:
        assert float(jnp.abs(logits).max()) <= cfg.logit_softcap
    if dtype == "bfloat16":  # bf16 compute stays close to f32
        ref = _model(family_cfg)(tokens)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.15)


def test_param_tree_names(family_cfg):
    model = Transformer(family_cfg, rngs=nnx.Rngs(0))
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert flat["embed.embedding"].get_metadata()["out_sharding"] == ("vocab", "embed")
    assert flat["layers.0.attn.q.kernel"].get_metadata()["out_sharding"] == (
        "embed", "heads", "head_dim"
    )  # fmt: skip
    assert flat["layers.1.attn.o.kernel"].shape == (4, 16, 64)
    assert ("lm_head.kernel" in flat) == (not family_cfg.tie_embeddings)
    assert ("pos_embed.embedding" in flat) == (family_cfg.pos == "learned")
    assert ("layers.0.post_attn_norm.scale" in flat) == family_cfg.post_norms
    assert ("layers.0.mlp.gate.kernel" in flat) == (family_cfg.mlp != "gelu")
    assert ("layers.0.attn.q.bias" in flat) == family_cfg.qkv_bias
    for name, v in flat.items():
        assert v.get_metadata().get("out_sharding"), f"{name} names no logical axes"


def test_packing_isolation(family_cfg):
    """A segment's logits do not change when another segment is packed beside it."""
    model = _model(family_cfg)
    a = _tokens(family_cfg, 1, 7, seed=1)
    b = _tokens(family_cfg, 1, 5, seed=2)
    alone = model(a)
    packed = jnp.concatenate([a, b], axis=1)
    pos = jnp.concatenate([jnp.arange(7), jnp.arange(5)])[None]
    seg = jnp.concatenate([jnp.ones(7, jnp.int32), 2 * jnp.ones(5, jnp.int32)])[None]
    out = model(packed, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(out[:, :7]), np.asarray(alone), atol=1e-5)
    # The second segment is also unaffected by the first.
    np.testing.assert_allclose(np.asarray(out[:, 7:]), np.asarray(model(b)), atol=1e-5)


def test_decode_matches_full_forward(family_cfg):
    model = _model(family_cfg)
    tokens = _tokens(family_cfg)
    full = model(tokens)
    cache = model.init_cache(B, T + 2)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    logits, cache = model.decode(tokens[:, :5], pos[:, :5], cache)
    outs = [logits]
    for t in range(5, T):
        logits, cache = model.decode(tokens[:, t : t + 1], pos[:, t : t + 1], cache)
        outs.append(logits)
    assert int(cache.index) == T
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-4)


def _stacked_copy(plain, cfg):
    """A scan_layers model holding exactly the plain model's weights."""
    scanned = Transformer(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0))
    src = nnx.to_pure_dict(nnx.state(plain))
    dst = nnx.to_pure_dict(nnx.state(scanned))
    layers = [src["layers"][i] for i in range(cfg.n_layers)]
    dst = {**src, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    nnx.update(scanned, dst)
    return scanned


def _loss_and_grad(model, tokens):
    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 3])

    return nnx.value_and_grad(loss)(model)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_remat_match_plain(family_cfg, remat):
    plain = _model(family_cfg)
    tokens = _tokens(family_cfg)
    ref_loss, ref_grad = _loss_and_grad(plain, tokens)
    ref_logits = plain(tokens)
    variants = {"scan": _stacked_copy(plain, family_cfg.replace(remat=remat))}
    if remat != "none":
        variants["remat"] = _model(family_cfg.replace(remat=remat))
    for name, m in variants.items():
        np.testing.assert_allclose(
            np.asarray(m(tokens)), np.asarray(ref_logits), atol=1e-5, err_msg=name
        )
        loss, grad = jax.jit(_loss_and_grad)(m, tokens)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        g = nnx.to_pure_dict(grad)
        rg = nnx.to_pure_dict(ref_grad)
        if name == "scan":
            g["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], g["layers"]) for i in range(2)}
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(rg), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=name)


def test_scan_decode_matches_forward():
    from conftest import FAMILIES

    cfg = FAMILIES["gemma2"]
    scanned = _stacked_copy(_model(cfg), cfg)
    tokens = _tokens(cfg)
    full = scanned(tokens)
    cache = scanned.init_cache(B, T)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    logits, cache = scanned.decode(tokens[:, :-1], pos[:, :-1], cache)
    last, _ = scanned.decode(tokens[:, -1:], pos[:, -1:], cache)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), atol=1e-4)


def test_cudnn_option_matches_xla(family_cfg):
    """attention='cudnn' (jax.nn.dot_product_attention; XLA impl on CPU) gives the same logits."""
    tokens = _tokens(family_cfg)
    seg = jnp.array([[1] * 6 + [2] * 6, [0] * 3 + [1] * 9])
    ref = _model(family_cfg)(tokens, segment_ids=seg)
    out = _model(family_cfg.replace(attention="cudnn"))(tokens, segment_ids=seg)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5)


def test_linear_rope_scaling_is_position_division():
    cfg = __import__("conftest").FAMILIES["llama"]
    scaled = cfg.replace(rope_scaling={"rope_type": "linear", "factor": 2.0})
    tokens = _tokens(cfg, 1, 6)
    pos = jnp.arange(6)[None]
    a = Transformer(scaled, rngs=nnx.Rngs(0))(tokens, positions=2 * pos)
    b = Transformer(cfg, rngs=nnx.Rngs(0))(tokens, positions=pos)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_llama3_rope_frequencies():
    scaling = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    base = rope_inv_freq(128, 500000.0)
    inv = rope_inv_freq(128, 500000.0, scaling)
    wavelen = 2 * np.pi / base
    np.testing.assert_allclose(inv[wavelen < 8192 / 4], base[wavelen < 8192 / 4])  # high freq kept
    np.testing.assert_allclose(inv[wavelen > 8192], base[wavelen > 8192] / 8.0, rtol=1e-6)
    mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert mid.any() and np.all(inv[mid] < base[mid]) and np.all(inv[mid] > base[mid] / 8.0)


def test_jit_split_merge_roundtrip():
    cfg = __import__("conftest").FAMILIES["llama"]
    model = _model(cfg)
    graphdef, state = nnx.split(model)
    tokens = _tokens(cfg)
    out = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(tokens)), atol=1e-5)
