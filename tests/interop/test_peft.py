"""PEFT adapters: fft LoRA -> PEFT directory -> peft.PeftModel logits; and back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fft.interop import hf
from fft.interop import peft as fft_peft
from fft.models.lora import apply_lora, has_lora
from fft.models.presets import get_preset
from fft.models.transformer import Transformer
from tests.interop.conftest import left_padded_batch

LORA = {"rank": 4, "alpha": 8.0, "rslora": False, "dropout": 0.0}


def _lora_model_live(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LORA["rank"], LORA["alpha"], rngs=nnx.Rngs(1))
    from fft.models.lora import lora_modules

    for i, (_, lin) in enumerate(lora_modules(model, ".*")):
        if not hasattr(lin, "lora_b"):  # lm_head is not a default target
            continue
        shape = lin.lora_b[...].shape
        lin.lora_b[...] = jax.random.normal(jax.random.key(i), shape) * 0.05
    return model


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_peft_export_matches_peft_model(family, transformers_mod, torch_mod, tmp_path):
    peft = pytest.importorskip("peft")
    cfg = get_preset("micro").replace(vocab_size=128)
    if family == "gemma":
        cfg = cfg.replace(family="gemma", norm_offset=1.0, mlp="geglu", act="gelu_tanh",
                          embed_scale=True, tie_embeddings=True)  # fmt: skip
    model = _lora_model_live(cfg)
    from fft.models.lora import disable_lora

    with disable_lora(model):
        hf.export_hf(model, cfg, str(tmp_path / "base"))
    fft_peft.export_peft(model, cfg, LORA, str(tmp_path / "adapter"), str(tmp_path / "base"))
    base = transformers_mod.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "base"), attn_implementation="eager"
    )
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    tok, mask, pos = left_padded_batch(cfg.vocab_size)
    with torch_mod.no_grad():
        want = peft_model(
            input_ids=torch_mod.tensor(tok, dtype=torch_mod.long),
            attention_mask=torch_mod.tensor(mask),
            position_ids=torch_mod.tensor(pos, dtype=torch_mod.long),
        ).logits.numpy()
    got = np.asarray(model(jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(mask)))
    with disable_lora(model):
        plain = np.asarray(model(jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(got - plain)[real].max() > 1e-3  # the adapter matters
    np.testing.assert_allclose(got[real], want[real], atol=1e-4)

    # import_peft onto a fresh model (no LoRA yet) reproduces the adapted logits.
    fresh = Transformer(cfg, rngs=nnx.Rngs(0))
    assert not has_lora(fresh)
    fft_peft.import_peft(str(tmp_path / "adapter"), fresh)
    again = np.asarray(fresh(jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(mask)))
    np.testing.assert_allclose(again[real], got[real], atol=1e-5)


def test_export_hf_folds_lora(transformers_mod, torch_mod, tmp_path):
    cfg = get_preset("micro").replace(vocab_size=128)
    model = _lora_model_live(cfg)
    hf.export_hf(model, cfg, str(tmp_path))
    back = transformers_mod.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tok, mask, pos = left_padded_batch(cfg.vocab_size)
    with torch_mod.no_grad():
        want = back(
            input_ids=torch_mod.tensor(tok, dtype=torch_mod.long),
            attention_mask=torch_mod.tensor(mask),
            position_ids=torch_mod.tensor(pos, dtype=torch_mod.long),
        ).logits.numpy()
    got = np.asarray(model(jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4)


def test_export_peft_from_flat_dict(tmp_path):
    """fft.api passes a flat {'layers.0.attn.q.lora_a': array} dict from a checkpoint."""
    import json

    cfg = get_preset("micro").replace(vocab_size=128)
    model = _lora_model_live(cfg)
    flat = {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}  # fmt: skip
    fft_peft.export_peft(flat, cfg, LORA, str(tmp_path), base_model_name_or_path="base")
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert "self_attn.q_proj" in config["target_modules"]
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    a = t["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"]
    assert a.shape == (4, cfg.n_heads * cfg.head_dim)
    assert t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)


def test_lm_head_adapter_of_a_padded_vocab_round_trips(transformers_mod, torch_mod, tmp_path):
    """Issue 17 #9: with a padded vocabulary (100 tokens in 128 rows) the exported base and the
    lm_head adapter have 100 rows, PEFT gives fft's logits on them, and import pads back."""
    peft = pytest.importorskip("peft")
    from fft.models.lora import disable_lora

    cfg = get_preset("micro").with_vocab(100)
    assert (cfg.vocab_size, cfg.n_tokens) == (128, 100)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LORA["rank"], LORA["alpha"], ("q", "lm_head"), rngs=nnx.Rngs(1))
    for i, lin in enumerate((model.lm_head, model.layers[0].attn.q)):
        lin.lora_b[...] = jax.random.normal(jax.random.key(i), lin.lora_b[...].shape) * 0.05
    with disable_lora(model):
        hf.export_hf(model, cfg, str(tmp_path / "base"))
    fft_peft.export_peft(model, cfg, LORA, str(tmp_path / "adapter"), str(tmp_path / "base"))
    base = transformers_mod.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "base"), attn_implementation="eager"
    )
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    tok, mask, pos = left_padded_batch(100)
    with torch_mod.no_grad():
        want = peft_model(
            input_ids=torch_mod.tensor(tok, dtype=torch_mod.long),
            attention_mask=torch_mod.tensor(mask),
            position_ids=torch_mod.tensor(pos, dtype=torch_mod.long),
        ).logits.numpy()
    got = np.asarray(model(jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert want.shape[-1] == 100 and got.shape[-1] == 128
    np.testing.assert_allclose(got[..., :100][real], want[real], atol=1e-4)

    fresh = Transformer(cfg, rngs=nnx.Rngs(0))
    fft_peft.import_peft(str(tmp_path / "adapter"), fresh)
    assert fresh.lm_head.lora_b[...].shape == (4, 128)
    again = np.asarray(fresh(jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(mask)))
    np.testing.assert_allclose(again[real], got[real], atol=1e-5)
