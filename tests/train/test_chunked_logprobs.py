"""`chunked_token_logprobs` equals the unchunked log-softmax and entropy (values and gradients),
on raw arrays and on real decoders (padded vocabulary, softcap, tied embeddings, LoRA head), and
the users of it (PPO loss, DPO pair log-probs, perplexity) give the unchunked numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fft.eval import perplexity
from fft.methods import dpo
from fft.models import lora as lora_lib
from fft.models.presets import get_preset
from fft.models.transformer import Transformer
from fft.rl import objectives, ppo, rollout
from fft.train import losses


def _ref_logprobs_entropy(logits_btv, tokens_bt):
    """float64 numpy: token-aligned log p(x_t) and entropy of the distribution at t-1."""
    z = np.asarray(logits_btv, np.float64)[:, :-1]
    m = z.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(z - m).sum(-1))
    logp = z - lse[..., None]
    lp = np.take_along_axis(logp, np.asarray(tokens_bt)[:, 1:, None], -1)[..., 0]
    ent = -(np.exp(logp) * logp).sum(-1)
    pad = lambda x: np.pad(x, ((0, 0), (1, 0)))  # noqa: E731
    return pad(lp), pad(ent)


@pytest.mark.parametrize("chunk", [1, 3, 8, 100])
def test_arrays_values_and_grads(chunk):
    # T - 1 = 8 predicted positions: chunk 3 leaves a padded last chunk, 100 is clamped to 8.
    r = np.random.default_rng(0)
    b, t, d, v = 2, 9, 6, 13
    h = jnp.asarray(r.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(r.normal(size=(d, v)), jnp.float32)
    tokens = jnp.asarray(r.integers(0, v, (b, t)), jnp.int32)
    cot_lp = jnp.asarray(r.normal(size=(b, t)), jnp.float32)
    cot_ent = jnp.asarray(r.normal(size=(b, t)), jnp.float32)
    temp = jnp.float32(0.7)

    want_lp, want_ent = _ref_logprobs_entropy(np.einsum("btd,dv->btv", h, w) / 0.7, tokens)

    def plain(h, w, temp):
        logits = jnp.einsum("btd,dv->btv", h, w) / temp
        lp = losses.token_logprobs(logits, tokens)
        ent = rollout.shift_right(objectives.entropy_from_logits(logits))
        return (lp * cot_lp).sum() + (ent * cot_ent).sum(), (lp, ent)

    def chunked(h, w, temp):
        lp, ent = losses.chunked_token_logprobs(
            h, w, tokens, chunk=chunk, temperature=temp, with_entropy=True
        )
        return (lp * cot_lp).sum() + (ent * cot_ent).sum(), (lp, ent)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))  # noqa: E731
    (vp, (lp_p, ent_p)), gp = grad(plain)(h, w, temp)
    (vc, (lp_c, ent_c)), gc = grad(chunked)(h, w, temp)
    np.testing.assert_allclose(lp_c, want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent_c, want_ent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lp_c, lp_p, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ent_c, ent_p, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vc, vp, rtol=1e-6)
    for a, b_ in zip(gc, gp, strict=True):  # d/dh, d/dW and d/dtemperature
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)
    # Without entropy: the same log-probs alone; a callable unembedding is the same as the matrix.
    lp_only = losses.chunked_token_logprobs(
        h, lambda x: jnp.einsum("bcd,dv->bcv", x, w), tokens, chunk=chunk, temperature=0.7
    )
    np.testing.assert_allclose(lp_only, lp_c, rtol=1e-6, atol=1e-6)


def test_one_token_rows_are_zero():
    h = jnp.ones((2, 1, 4))
    lp, ent = losses.chunked_token_logprobs(
        h, jnp.ones((4, 5)), jnp.zeros((2, 1), jnp.int32), with_entropy=True
    )
    assert lp.shape == ent.shape == (2, 1) and not np.asarray(lp).any()


def _decoder(*, padded=False, softcap=0.0, tied=False, lora_head=False, seed=0):
    cfg = get_preset("micro").replace(
        max_seq_len=64, logit_softcap=softcap, tie_embeddings=tied, vocab_size=512
    )
    if padded:
        cfg = cfg.replace(real_vocab_size=300)  # ids 300..511 are padding rows
    rngs = nnx.Rngs(seed)
    model = Transformer(cfg, rngs=rngs)
    if lora_head:
        lora_lib.apply_lora(model, rank=4, alpha=8.0, targets=("q", "v", "lm_head"), rngs=rngs)
        for _, lin in lora_lib.lora_modules(model, ("q", "v", "lm_head")):
            key = jax.random.key(len(lin.lora_b[...].shape))
            lin.lora_b[...] = 0.3 * jax.random.normal(key, lin.lora_b[...].shape)
    return model


def _batch(model, b=3, t=11, seed=1):
    r = np.random.default_rng(seed)
    n = model.cfg.n_tokens
    tokens = r.integers(0, n, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[0, -3:] = 0  # right padding on one row
    mask = (r.random((b, t)) > 0.3).astype(np.float32) * seg
    mask[:, 0] = 0  # the Batch convention: the first token is never a target
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return {
        "tokens": jnp.asarray(tokens),
        "positions": jnp.asarray(positions),
        "segment_ids": jnp.asarray(seg),
        "loss_mask": jnp.asarray(mask),
    }


MODELS = {
    "padded_vocab": dict(padded=True),
    "softcap_tied": dict(softcap=5.0, tied=True),
    "lora_head_padded": dict(lora_head=True, padded=True),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_decoder_values_and_param_grads(name):
    model = _decoder(**MODELS[name])
    batch = _batch(model)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"]

    def objective(lp, ent):  # like PPO: log-probs and an entropy bonus, token-masked
        return ((lp - 0.1 * ent) * mask).sum()

    def plain(m):
        logits = m(*args) / 0.8
        lp = losses.token_logprobs(logits, batch["tokens"])
        ent = rollout.shift_right(objectives.entropy_from_logits(logits))
        return objective(lp, ent), (lp, ent)

    def chunked(m):
        hidden = m.hidden_states(*args)
        lp, ent = losses.chunked_token_logprobs(
            hidden, m.logits, batch["tokens"], chunk=4, temperature=0.8, with_entropy=True
        )  # 10 predicted positions in chunks of 4: the last chunk is padded
        return objective(lp, ent), (lp, ent)

    grad = lambda f: nnx.jit(nnx.value_and_grad(f, has_aux=True))  # noqa: E731
    (vp, (lp_p, ent_p)), gp = grad(plain)(model)
    (vc, (lp_c, ent_c)), gc = grad(chunked)(model)
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(model(*args), np.float64) / 0.8
    want_lp, want_ent = _ref_logprobs_entropy(logits, batch["tokens"])
    np.testing.assert_allclose(lp_c, want_lp, atol=2e-5)
    np.testing.assert_allclose(ent_c, want_ent, atol=2e-5)
    np.testing.assert_allclose(lp_c, lp_p, atol=2e-5)
    np.testing.assert_allclose(ent_c, ent_p, atol=2e-5)
    np.testing.assert_allclose(vc, vp, rtol=1e-5)
    if MODELS[name].get("padded"):  # padding ids carry no mass: entropy over real ids only
        assert float(np.max(want_ent)) <= np.log(300) + 1e-6
    flat_p, flat_c = dict(nnx.to_flat_state(gp)), dict(nnx.to_flat_state(gc))
    assert flat_p.keys() == flat_c.keys()
    for k in flat_p:
        a, b_ = np.asarray(flat_c[k][...]), np.asarray(flat_p[k][...])
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(b_).max()))
    if MODELS[name].get("lora_head"):
        head_b = [k for k in flat_c if "lm_head" in map(str, k) and "lora_b" in map(str, k)]
        assert head_b and np.abs(np.asarray(flat_c[head_b[0]][...])).max() > 0


def test_ppo_loss_and_reference_match_unchunked():
    """The PPO loss (entropy bonus, in-loss KL) and `teacher_forced` against the unchunked path."""
    model = _decoder(lora_head=True, padded=True)
    batch = _batch(model, t=13)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    r = np.random.default_rng(3)
    temp = 0.9
    logits = model(*args) / temp
    lp = losses.token_logprobs(logits, batch["tokens"])
    with lora_lib.disable_lora(model):
        ref_lp = losses.token_logprobs(model(*args) / temp, batch["tokens"])
    logp, ref_logp, _ = rollout.teacher_forced(model, None, batch, jnp.float32(temp))
    np.testing.assert_allclose(logp, lp, atol=2e-5)
    np.testing.assert_allclose(ref_logp, ref_lp, atol=2e-5)
    assert np.abs(np.asarray(lp - ref_lp) * batch["loss_mask"]).max() > 1e-3  # LoRA off differs

    mask = batch["loss_mask"]
    adv = jnp.asarray(r.normal(size=mask.shape), jnp.float32) * mask
    old = (lp + 0.05 * jnp.asarray(r.normal(size=mask.shape), jnp.float32)) * mask
    mb = dict(batch, old_logprobs=old, advantages=adv, ref_logprobs=ref_lp * mask)
    fn = ppo.make_loss_fn(  # 12 predicted positions in chunks of 5
        use_value=False, ent_coef=0.01, kl_loss_coef=0.05, temperature=temp, chunk=5
    )
    loss, aux = fn(model, mb, None)
    # The same loss by hand from the unchunked log-softmax.
    ent = rollout.shift_right(objectives.entropy_from_logits(logits))
    ratio = jnp.exp(lp - old)
    pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 0.8, 1.2))
    k3 = jnp.exp(ref_lp - lp) - (ref_lp - lp) - 1.0
    want = ((pg - 0.01 * ent + 0.05 * k3) * mask).sum() / mask.sum()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["entropy"], (ent * mask).sum() / mask.sum(), rtol=1e-5)


def test_dpo_pair_logprobs_and_perplexity_match_unchunked():
    model = _decoder(padded=True)
    b = {s: _batch(model, t=10, seed=i) for i, s in enumerate(dpo.SIDES)}
    batch = {f"{s}_{f}": b[s][f] for s in dpo.SIDES for f in dpo.FIELDS}
    c, r_, n_c, n_r = dpo.pair_logprobs(model, batch, chunk=4)  # 9 positions in chunks of 4
    for got, n, side in ((c, n_c, "chosen"), (r_, n_r, "rejected")):
        x = b[side]
        lp = losses.token_logprobs(
            model(x["tokens"], x["positions"], x["segment_ids"]), x["tokens"]
        )
        np.testing.assert_allclose(got, (lp * x["loss_mask"]).sum(1), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(n, x["loss_mask"].sum(1))
    x = b["chosen"]
    logits = model(x["tokens"], x["positions"], x["segment_ids"])
    want = float(losses.next_token_loss(logits, x))
    got = perplexity.evaluate(model, [{k: np.asarray(v) for k, v in x.items()}])
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)


def test_domain_nll_with_vocab_limit_and_facts_scores_match_unchunked():
    """The domain eval scores the extended model on the first K ids only; facts sum a cloze."""
    from fft.eval import facts
    from fft.methods import domain

    model = _decoder(padded=True)
    x = _batch(model, t=12)
    x["tokens"] = x["tokens"] % 200  # every token below the limit
    logits = model(x["tokens"], x["positions"], x["segment_ids"])
    mask = x["loss_mask"]
    for limit in (None, 200):
        z = logits if limit is None else logits[..., :limit]
        want = -(losses.token_logprobs(z, x["tokens"]) * mask).sum()
        nll, n = domain._nll_fn(limit)(model, x)
        np.testing.assert_allclose(nll, want, rtol=1e-5)
        np.testing.assert_allclose(n, mask.sum())
    got = facts._seq_logprobs(model, x["tokens"], x["segment_ids"], mask)
    z = model(x["tokens"], None, x["segment_ids"])
    want = (losses.token_logprobs(z, x["tokens"]) * mask).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
