"""Decoder parity with transformers: load, left-padded logits, greedy generation, export."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fft.config_lib import FFTError
from fft.interop import hf
from tests.interop.conftest import left_padded_batch, perturb_norms_and_biases

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip


def hf_config(transformers, family):
    t = transformers
    return {
        "llama": lambda: t.LlamaConfig(**COMMON, rope_scaling=LLAMA3_ROPE),
        "llama_linear": lambda: t.LlamaConfig(
            **COMMON, rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True
        ),
        "mistral": lambda: t.MistralConfig(**COMMON, sliding_window=5),
        "qwen2": lambda: t.Qwen2Config(**COMMON),
        "gemma": lambda: t.GemmaConfig(**COMMON, head_dim=16),
        "gemma2": lambda: t.Gemma2Config(**COMMON, head_dim=16, sliding_window=5),
        # head_dim 24 != d / heads = 16; QK-norm, no QKV bias.
        "qwen3": lambda: t.Qwen3Config(**COMMON, head_dim=24),
        # Layers 0, 1 sliding (window 5 < the 12-token batch), layer 2 global; local and global
        # rope bases differ; the query scale is not head_dim ** -0.5.
        "gemma3": lambda: t.Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 3},
            head_dim=24,
            sliding_window=5,
            sliding_window_pattern=3,
            query_pre_attn_scalar=20,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),  # fmt: skip
        "gpt2": lambda: t.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    }[family]()


FAMILIES = [
    "llama", "llama_linear", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2",
]  # fmt: skip
_CACHE = {}


@pytest.fixture(params=FAMILIES)
def pair(request, transformers_mod, torch_mod, tmp_path_factory):
    """(family, HF torch model, its directory, fft model), built once per family."""
    family = request.param
    if family not in _CACHE:
        torch_mod.manual_seed(0)
        cfg = hf_config(transformers_mod, family)
        ref = transformers_mod.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        perturb_norms_and_biases(ref.eval(), torch_mod)
        d = str(tmp_path_factory.mktemp(family))
        ref.save_pretrained(d)
        model, _ = hf.load_hf_model(d)
        _CACHE[family] = (family, ref, d, model)
    return _CACHE[family]


def _hf_logits(torch_mod, ref, tok, mask, pos):
    with torch_mod.no_grad():
        out = ref(
            input_ids=torch_mod.tensor(tok, dtype=torch_mod.long),
            attention_mask=torch_mod.tensor(mask),
            position_ids=torch_mod.tensor(pos, dtype=torch_mod.long),
        )
    return out.logits.numpy()


def test_logits_match_left_padded(pair, torch_mod):
    family, ref, _, model = pair
    tok, mask, pos = left_padded_batch(VOCAB)
    want = _hf_logits(torch_mod, ref, tok, mask, pos)
    got = np.asarray(model(jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(mask)))
    real = mask.astype(bool)  # pad rows are garbage on both sides
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, err_msg=family)


def test_greedy_generation_matches(pair, torch_mod):
    from fft.sampling import generate_tokens

    family, ref, _, model = pair
    tok, mask, _ = left_padded_batch(VOCAB, t=8, pad=3, seed=1)
    out = generate_tokens(model, tok, mask, max_new_tokens=20)
    with torch_mod.no_grad():
        want = ref.generate(
            input_ids=torch_mod.tensor(tok, dtype=torch_mod.long),
            attention_mask=torch_mod.tensor(mask),
            # No stop id in range: fft's loop has none, and min_new_tokens would instead ban
            # the eos id from HF's choices (a random model may pick it: qwen3 did).
            max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=VOCAB + 1,
        )[:, tok.shape[1] :].numpy()  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out.tokens), want, err_msg=family)


def test_export_round_trip(pair, transformers_mod, torch_mod, tmp_path):
    family, ref, _, model = pair
    hf.export_hf(model, model.cfg, str(tmp_path))
    back = transformers_mod.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager"
    ).eval()
    assert type(back) is type(ref)
    tok, mask, pos = left_padded_batch(VOCAB, seed=2)
    real = mask.astype(bool)
    want = _hf_logits(torch_mod, ref, tok, mask, pos)
    np.testing.assert_allclose(
        _hf_logits(torch_mod, back, tok, mask, pos)[real], want[real], atol=1e-5
    )
    assert hf.config_from_hf(hf.read_hf_config(str(tmp_path))) == model.cfg


def test_sharded_files_and_shardings(pair, tmp_path):
    """Multi-file export (with index) loads back straight into a 2x2x2 mesh."""
    from fft import sharding

    family, _, _, model = pair
    if family not in ("llama", "gpt2"):
        pytest.skip("one rope and one learned-position family suffice")
    hf.export_hf(model, model.cfg, str(tmp_path), max_shard_bytes=64 << 10)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(files) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json")
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    abstract = nnx.state(hf.build_abstract(model.cfg), nnx.Param)
    shardings = sharding.state_shardings(abstract, mesh)
    cfg, params = hf.load_hf(str(tmp_path), shardings=shardings)
    q = params["layers"][0]["attn"]["q"]["kernel"].get_value()
    assert q.sharding.spec == shardings["layers"][0]["attn"]["q"]["kernel"].get_value().spec
    assert len(q.sharding.device_set) == 8
    want = nnx.state(model, nnx.Param)
    for (p, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), str(p))


def test_bf16_checkpoint(transformers_mod, torch_mod, tmp_path):
    torch_mod.manual_seed(0)
    ref = transformers_mod.LlamaForCausalLM(hf_config(transformers_mod, "llama"))
    ref.to(torch_mod.bfloat16).save_pretrained(str(tmp_path))
    cfg, params = hf.load_hf(str(tmp_path), dtype=jnp.bfloat16)
    k = params["layers"][1]["mlp"]["down"]["kernel"].get_value()
    assert k.dtype == jnp.bfloat16 and cfg.param_dtype == "bfloat16"
    want = ref.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(k, np.float32), want)
    cfg32, params32 = hf.load_hf(str(tmp_path))  # upcast on load
    assert params32["embed"]["embedding"].get_value().dtype == jnp.float32


def test_partial_load_into_wrapper(pair):
    """load_spec's load_weights fills a model nested under another module by path suffix."""
    family, _, d, model = pair
    if family != "llama":
        pytest.skip("path matching is family independent")
    cfg, _, load_weights = hf.load_spec(d)

    class Wrapper(nnx.Module):
        def __init__(self):
            from fft.models.transformer import Transformer

            self.backbone = Transformer(cfg, rngs=nnx.Rngs(1))
            self.head = nnx.Linear(cfg.d_model, 3, rngs=nnx.Rngs(2))

    abstract = nnx.state(nnx.eval_shape(Wrapper), nnx.Param)
    got = dict(nnx.to_flat_state(load_weights(abstract)))
    assert not any(p[0] == "head" for p in got)
    q = got[("backbone", "layers", 0, "attn", "q", "kernel")].get_value()
    np.testing.assert_array_equal(q, model.layers[0].attn.q.kernel.get_value())


def test_errors_name_the_problem(tmp_path, pair):
    family, _, d, _ = pair
    if family != "llama":
        pytest.skip("family independent")
    with pytest.raises(FFTError, match="t5"):
        hf.config_from_hf({"model_type": "t5"})
    with pytest.raises(FFTError, match="config.json"):
        hf.load_hf(str(tmp_path))
    # A checkpoint that lacks one tensor.
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(d, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open(os.path.join(d, "config.json")) as fh:
        config = json.load(fh)
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(config, fh)
    with pytest.raises(FFTError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        hf.load_hf(str(tmp_path))


def test_config_round_trip_of_presets():
    from fft.models.presets import get_preset

    for name in ("micro", "tiny", "1b"):
        cfg = get_preset(name)
        assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg.replace(max_seq_len=cfg.max_seq_len)
    with pytest.raises(FFTError, match="post_norms"):
        hf.config_to_hf(get_preset("micro").replace(post_norms=True))


@pytest.mark.parametrize("family", ["llama", "llama_linear", "gpt2"])
def test_padded_vocab_exports_real_rows(family, transformers_mod, torch_mod, tmp_path):
    """Issue 17 #9: an fft model with a padded vocabulary (300 tokens in 384 rows) exports a
    300-row model that transformers loads, with fft's logits on the real ids."""
    from fft.models.transformer import Transformer

    cfg = hf.config_from_hf(hf_config(transformers_mod, family).to_dict()).with_vocab(300)
    assert (cfg.vocab_size, cfg.real_vocab_size) == (384, 300)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    hf.export_hf(model, cfg, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 300
    back = transformers_mod.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager"
    ).eval()
    assert tuple(back.get_input_embeddings().weight.shape) == (300, 64)
    assert tuple(back.get_output_embeddings().weight.shape) == (300, 64)
    tok, mask, pos = left_padded_batch(300, seed=3)
    real = mask.astype(bool)
    want = np.asarray(model(jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(mask)))
    assert want.shape[-1] == 384
    got = _hf_logits(torch_mod, back, tok, mask, pos)
    np.testing.assert_allclose(got[real], want[..., :300][real], atol=1e-4, err_msg=family)
