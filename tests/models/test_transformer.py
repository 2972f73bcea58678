"""Decoder forward, packing isolation, KV-cache decode, scan/remat equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_testlib import FAMILIES, decode, forward, hidden, tokens

from fft.models.layers import dense, rope_inv_freq
from fft.models.transformer import Transformer

B, T = 2, 12


def _randomize_norms(model, seed=1):
    """Random norm scales and biases, so that norm offsets and biases are actually exercised."""
    key = jax.random.key(seed)

    def f(path, x):
        names = [str(getattr(p, "key", p)) for p in path]
        if any("norm" in n for n in names) or names[-1] == "bias":
            k = jax.random.fold_in(key, hash(tuple(names)) % 2**31)
            return x + 0.1 * jax.random.normal(k, x.shape)
        return x

    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    nnx.update(model, jax.tree_util.tree_map_with_path(f, pure))
    return model


def _model(cfg, seed=0):
    return _randomize_norms(Transformer(cfg, rngs=nnx.Rngs(seed)))


@pytest.mark.parametrize(
    "x_shape,w_shape,n_in", [((2, 3, 4), (4, 5, 6), 1), ((2, 3, 4, 5), (4, 5, 6), 2)]
)
def test_dense_grads_equal_tensordot(x_shape, w_shape, n_in):
    """The custom weight-gradient dot of `dense` equals JAX's own derivative of tensordot."""
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    c = jax.random.normal(kc, jnp.tensordot(x, w, n_in).shape)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w, n_in)) * c)

    ref = jax.grad(loss(lambda x, w, n: jnp.tensordot(x, w, axes=n)), argnums=(0, 1))(x, w)
    got = jax.grad(loss(dense), argnums=(0, 1))(x, w)
    np.testing.assert_array_equal(dense(x, w, n_in), jnp.tensordot(x, w, axes=n_in))
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(family_cfg, dtype):
    cfg = family_cfg.replace(dtype=dtype)
    model = _model(cfg)
    toks = tokens(cfg)
    logits = forward(model, toks)
    assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == jnp.float32
    h = hidden(model, toks)
    assert h.shape == (B, T, cfg.d_model) and h.dtype == jnp.dtype(dtype)
    assert np.isfinite(np.asarray(logits)).all()
    params = nnx.state(model, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    if cfg.logit_softcap:
        assert float(jnp.abs(logits).max()) <= cfg.logit_softcap
    if dtype == "bfloat16":  # bf16 compute stays close to f32
        ref = forward(_model(family_cfg), toks)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.15)


def test_param_tree_names(family_cfg):
    model = nnx.eval_shape(lambda: Transformer(family_cfg, rngs=nnx.Rngs(0)))
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert flat["embed.embedding"].get_metadata()["out_sharding"] == ("vocab", "embed")
    q_names = flat["layers.0.attn.q.kernel"].get_metadata()["out_sharding"]
    assert q_names == ("embed", "heads", "head_dim")
    assert flat["layers.1.attn.o.kernel"].shape == (4, 16, 64)
    assert ("lm_head.kernel" in flat) == (not family_cfg.tie_embeddings)
    assert ("pos_embed.embedding" in flat) == (family_cfg.pos == "learned")
    assert ("layers.0.post_attn_norm.scale" in flat) == family_cfg.post_norms
    assert ("layers.0.mlp.gate.kernel" in flat) == (family_cfg.mlp != "gelu")
    assert ("layers.0.attn.q.bias" in flat) == family_cfg.qkv_bias
    assert ("layers.1.attn.k_norm.scale" in flat) == family_cfg.qk_norm
    if family_cfg.qk_norm:
        assert flat["layers.1.attn.q_norm.scale"].shape == (family_cfg.head_dim,)
    for name, v in flat.items():
        assert v.get_metadata().get("out_sharding"), f"{name} names no logical axes"


def test_packing_isolation(family_cfg):
    """A segment's logits do not change when another segment is packed beside it."""
    model = _model(family_cfg)
    a, b = tokens(family_cfg, 1, 7, seed=1), tokens(family_cfg, 1, 5, seed=2)
    pad = jnp.zeros((1, 5), jnp.int32)
    ones = lambda n: jnp.ones((1, n), jnp.int32)  # noqa: E731
    # All three calls have shape [1, 12]: the same compiled forward.
    alone_a = forward(
        model, jnp.concatenate([a, pad], 1), None, jnp.concatenate([ones(7), 0 * ones(5)], 1)
    )
    alone_b = forward(
        model,
        jnp.concatenate([b, pad, pad[:, :2]], 1),
        None,
        jnp.concatenate([ones(5), 0 * ones(7)], 1),
    )
    pos = jnp.concatenate([jnp.arange(7), jnp.arange(5)])[None]
    seg = jnp.concatenate([ones(7), 2 * ones(5)], 1)
    packed = forward(model, jnp.concatenate([a, b], 1), pos, seg)
    np.testing.assert_allclose(np.asarray(packed[:, :7]), np.asarray(alone_a[:, :7]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(packed[:, 7:]), np.asarray(alone_b[:, :5]), atol=1e-5)


def test_decode_matches_full_forward(family_cfg):
    model = _model(family_cfg)
    toks = tokens(family_cfg)
    full = forward(model, toks)
    cache = model.init_cache(B, T + 2)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    logits, cache = decode(model, toks[:, :5], pos[:, :5], cache)
    outs = [logits]
    for t in range(5, T):
        logits, cache = decode(model, toks[:, t : t + 1], pos[:, t : t + 1], cache)
        outs.append(logits)
    assert int(cache.index) == T
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-4)


def _stacked_copy(plain, cfg):
    """A scan_layers model holding exactly the plain model's weights."""
    scanned = Transformer(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0))
    src = nnx.to_pure_dict(nnx.state(plain))
    layers = [src["layers"][i] for i in range(cfg.n_layers)]
    nnx.update(scanned, {**src, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)})
    return scanned


@nnx.jit
def _loss_and_grad(model, toks):
    return nnx.value_and_grad(lambda m: jnp.mean(jax.nn.log_softmax(m(toks))[..., 3]))(model)


def _check_same(model, ref_model, toks, scanned):
    np.testing.assert_allclose(
        np.asarray(forward(model, toks)), np.asarray(forward(ref_model, toks)), atol=1e-5
    )
    loss, grad = _loss_and_grad(model, toks)
    ref_loss, ref_grad = _loss_and_grad(ref_model, toks)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    g, rg = nnx.to_pure_dict(grad), nnx.to_pure_dict(ref_grad)
    if scanned:
        g["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], g["layers"]) for i in range(2)}
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(rg), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_scan_layers_match_plain(family_cfg):
    """Same logits and gradients from stacked params under lax.scan (gemma2: mixed windows)."""
    plain = _model(family_cfg)
    remat = "dots" if family_cfg.family == "llama" else "none"
    _check_same(
        _stacked_copy(plain, family_cfg.replace(remat=remat)), plain, tokens(family_cfg), True
    )


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_matches_plain(remat):
    cfg = FAMILIES["llama"]
    _check_same(_model(cfg.replace(remat=remat)), _model(cfg), tokens(cfg), False)


def test_scan_decode_matches_forward():
    cfg = FAMILIES["gemma2"]
    scanned = _stacked_copy(_model(cfg), cfg)
    toks = tokens(cfg)
    full = forward(scanned, toks)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    _, cache = decode(scanned, toks[:, :-1], pos[:, :-1], scanned.init_cache(B, T))
    last, _ = decode(scanned, toks[:, -1:], pos[:, -1:], cache)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), atol=1e-4)


def test_cudnn_option_matches_xla():
    """attention='cudnn' (jax.nn.dot_product_attention; XLA impl on CPU) gives the same logits."""
    cfg = FAMILIES["llama"]
    toks = tokens(cfg)
    seg = jnp.array([[1] * 6 + [2] * 6, [0] * 3 + [1] * 9])
    ref = forward(_model(cfg), toks, None, seg)
    out = forward(_model(cfg.replace(attention="cudnn")), toks, None, seg)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5)


def test_linear_rope_scaling_is_position_division():
    cfg = FAMILIES["llama"]
    scaled = cfg.replace(rope_scaling={"rope_type": "linear", "factor": 2.0})
    toks = tokens(cfg, 1, 6)
    pos = jnp.arange(6)[None]
    a = forward(Transformer(scaled, rngs=nnx.Rngs(0)), toks, 2 * pos)
    b = forward(Transformer(cfg, rngs=nnx.Rngs(0)), toks, pos)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_llama3_rope_frequencies():
    scaling = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    base = rope_inv_freq(128, 500000.0)
    inv = rope_inv_freq(128, 500000.0, scaling)
    wavelen = 2 * np.pi / base
    high = wavelen < 8192 / 4
    np.testing.assert_allclose(inv[high], base[high])  # high frequencies kept
    low = wavelen > 8192
    np.testing.assert_allclose(inv[low], base[low] / 8.0, rtol=1e-6)
    mid = ~high & ~low
    assert mid.any() and np.all(inv[mid] < base[mid]) and np.all(inv[mid] > base[mid] / 8.0)


def test_jit_split_merge_roundtrip():
    cfg = FAMILIES["llama"]
    model = _model(cfg)
    graphdef, state = nnx.split(model)
    toks = tokens(cfg)
    out = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, toks)
    np.testing.assert_allclose(np.asarray(out), np.asarray(forward(model, toks)), atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_padded_vocab_rows_are_never_chosen(tied):
    """Issue 17 #9: a model built from a 300-token tokenizer has 384 rows (a multiple of 128);
    the logits of ids >= 300 are masked (argmax, probability, sampling, generation), with a
    finite value so that KL terms p * (log p - log q) stay finite."""
    from types import SimpleNamespace

    from fft import config_lib
    from fft.sampling import generate_tokens
    from fft.train import lm

    config = config_lib.base_config()
    config.model.preset = "micro"
    config.seq_len = 64
    cfg = lm.scratch_base(config, SimpleNamespace(vocab_size=300)).model_config
    cfg = cfg.replace(tie_embeddings=tied)
    assert (cfg.vocab_size, cfg.real_vocab_size, cfg.n_tokens) == (384, 300, 300)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert model.embed.embedding[...].shape[0] == 384
    # Make the padding rows the best match for every hidden state, were they not masked.
    toks = jax.random.randint(jax.random.key(1), (B, T), 0, 300)
    h = model.hidden_states(toks)
    direction = h.reshape(-1, h.shape[-1]).mean(0)
    if tied:
        model.embed.embedding[...] = model.embed.embedding[...].at[300:].set(direction * 1e3)
    else:
        model.lm_head.kernel[...] = (
            model.lm_head.kernel[...].at[:, 300:].set(direction[:, None] * 1e3)
        )
    logits = model(toks)
    padding_logit = h.astype(jnp.float32) @ (direction * 1e3)  # what rows >= 300 would give
    assert float((padding_logit > logits[..., :300].max(-1)).mean()) > 0.9  # and win, unmasked
    assert logits.shape[-1] == 384 and np.isfinite(np.asarray(logits)).all()
    assert int(jnp.argmax(logits, -1).max()) < 300
    probs = jax.nn.softmax(logits, -1)
    assert float(probs[..., 300:].max()) == 0.0
    logp = jax.nn.log_softmax(logits, -1)
    logq = jax.nn.log_softmax(model(toks[:, ::-1]), -1)
    assert np.isfinite(np.asarray((probs * (logp - logq)).sum(-1))).all()
    mask = jnp.ones((B, 4), jnp.int32)
    for temperature in (0.0, 5.0):
        out = generate_tokens(model, toks[:, :4], mask, max_new_tokens=16, temperature=temperature)
        assert int(np.asarray(out.tokens).max()) < 300, temperature
