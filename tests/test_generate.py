"""Generation: cached greedy == uncached argmax, logprobs == teacher forcing, stops, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fft  # noqa: F401
from fft import sampling as gen
from fft.models.presets import get_preset
from fft.models.transformer import Transformer

N = 6
PROMPTS = [[5, 9, 17, 3, 44], [8, 2], [100, 200, 300]]  # different lengths -> left padding


class FakeTokenizer:
    """a-z <-> 3..28; 0 pad, 1 bos, 2 eos; ids beyond the letters decode as '?'."""

    vocab_size, bos_id, eos_id, pad_id, chat_template = 512, 1, 2, 0, None

    def encode(self, text, *, add_bos=False, add_eos=False):
        ids = [3 + ord(c) - ord("a") for c in text]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 3) if 3 <= i < 29 else "?" for i in ids)


@pytest.fixture(scope="module", params=["llama", "gemma2", "gemma3"])
def model(request):
    cfg = get_preset("micro")
    if request.param == "gemma2":
        cfg = cfg.replace(
            family="gemma2", norm_offset=1.0, mlp="geglu", act="gelu_tanh", embed_scale=True,
            logit_softcap=30.0, attn_softcap=50.0, post_norms=True, sliding_window=3,
            sliding_window_pattern=2, tie_embeddings=True,
        )  # fmt: skip
    if request.param == "gemma3":
        # Layers 0, 1 sliding with a 3-token window (prompts + new tokens reach 11), layer 2
        # global; separate rope bases, QK-norm, four norms per layer (the masked full cache).
        cfg = cfg.replace(
            family="gemma3_text", n_layers=3, norm_offset=1.0, mlp="geglu", act="gelu_tanh",
            embed_scale=True, post_norms=True, qk_norm=True, sliding_window=3,
            sliding_window_pattern=3, rope_theta=1e6, rope_local_theta=1e4, query_scale=0.2,
            tie_embeddings=True,
        )  # fmt: skip
    return Transformer(cfg, rngs=nnx.Rngs(0))


@nnx.jit
def _full(model, tokens, mask):
    """Full forward without cache; positions count real tokens (left padding)."""
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return model(tokens, positions=pos, segment_ids=mask)


def test_left_pad():
    tokens, mask = gen.left_pad(PROMPTS, pad_id=0)
    assert tokens.shape == (3, 5) and tokens.dtype == np.int32
    assert tokens[1].tolist() == [0, 0, 0, 8, 2] and mask[1].tolist() == [0, 0, 0, 1, 1]


def test_greedy_matches_uncached_argmax_and_logprobs(model):
    tokens, mask = gen.left_pad(PROMPTS, pad_id=0)
    out = gen.generate_tokens(model, tokens, mask, max_new_tokens=N)
    assert out.tokens.shape == (3, N) and out.logprobs.dtype == jnp.float32
    assert out.lengths.tolist() == [N] * 3 and out.mask.tolist() == [[1] * N] * 3
    # Step by step, without cache. Sequences are right-padded (segment 0) to one length so one
    # compiled forward serves every step; causal attention never sees the right padding.
    p = tokens.shape[1]
    seq = np.concatenate([tokens, np.zeros((3, N), np.int32)], 1)
    seq_mask = np.concatenate([mask, np.zeros((3, N), np.int32)], 1)
    for i in range(N):
        nxt = np.asarray(jnp.argmax(_full(model, seq, seq_mask)[:, p + i - 1], -1))
        np.testing.assert_array_equal(np.asarray(out.tokens[:, i]), nxt, err_msg=f"step {i}")
        seq[:, p + i], seq_mask[:, p + i] = nxt, 1
    # Teacher-forced log-probs of the same tokens.
    logp = jax.nn.log_softmax(_full(model, seq, seq_mask), -1)
    tf = jnp.take_along_axis(logp[:, p - 1 : -1], jnp.asarray(seq[:, p:])[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(tf), atol=1e-4)


def test_stop_tokens_and_early_exit(model):
    tokens, mask = gen.left_pad(PROMPTS, pad_id=0)
    free = np.asarray(gen.generate_tokens(model, tokens, mask, max_new_tokens=N).tokens)
    stop = int(free[0, 2])
    out = gen.generate_tokens(model, tokens, mask, max_new_tokens=N, stop_tokens=(stop,))
    first = [list(r).index(stop) if stop in r else None for r in free]
    for row in range(3):
        k = N if first[row] is None else first[row] + 1
        assert out.mask[row].tolist() == [1] * k + [0] * (N - k)
        assert int(out.lengths[row]) == k
        np.testing.assert_array_equal(np.asarray(out.tokens[row, :k]), free[row, :k])
        assert np.all(np.asarray(out.logprobs[row, k:]) == 0)
    # Every row stops at once: the loop exits early and the rest is masked.
    firsts = tuple(int(t) for t in free[:, 0])
    out = gen.generate_tokens(model, tokens, mask, max_new_tokens=N, stop_tokens=firsts)
    assert out.lengths.tolist() == [1, 1, 1] and int(out.tokens[:, 1:].sum()) == 0


def test_sampling_settings():
    model = Transformer(get_preset("micro"), rngs=nnx.Rngs(0))
    tokens, mask = gen.left_pad(PROMPTS, pad_id=0)
    greedy = gen.generate_tokens(model, tokens, mask, max_new_tokens=N)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        out = gen.generate_tokens(
            model, tokens, mask, max_new_tokens=N, temperature=1.0, rng=jax.random.key(3), **kw
        )
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(greedy.logprobs), atol=1e-5)
    a = gen.generate_tokens(
        model,
        tokens,
        mask,
        max_new_tokens=N,
        temperature=1.0,
        top_k=20,
        top_p=0.9,
        rng=jax.random.key(1),
    )
    b = gen.generate_tokens(
        model,
        tokens,
        mask,
        max_new_tokens=N,
        temperature=1.0,
        top_k=20,
        top_p=0.9,
        rng=jax.random.key(1),
    )
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert np.all(np.asarray(a.logprobs) <= 0)


def test_sample_logits_top_k_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = (
        lambda **kw: np.array(  # noqa: E731
            [int(gen.sample_logits(logits, k, temperature=1.0, **kw)[0]) for k in keys[:200]]
        )
    )
    assert set(draw(top_k=2, top_p=1.0)) <= {0, 1}
    assert set(draw(top_k=0, top_p=0.7)) <= {0, 1}  # 0.5 < 0.7, then 0.8 >= 0.7
    assert set(draw(top_k=0, top_p=0.5)) == {0}


def test_generate_strings(model):
    tok = FakeTokenizer()
    texts = gen.generate(model, tok, ["abc", "hello world"[:5]], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) and len(t) <= 4 for t in texts)
