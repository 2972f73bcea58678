"""Domain adaptation: vocabulary extension keeps the old tokens' outputs; the smoke run trains.

Loader behaviour the method relies on is tested in tests/data/: mixture weights honoured and
changeable on resume (test_pipeline.py::test_mixture_weights_and_change_on_resume), exact resume
(::test_resume_gives_identical_batches), malformed lines named by file:line
(test_sources.py::test_bad_record_names_file_and_line).
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from fft import config_lib, pretrained, tokenizers
from fft.data.synthetic import World
from fft.methods import domain
from fft.models import presets
from fft.models.transformer import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def world():
    return World(0)


def _flat(model):
    return {
        ".".join(map(str, p)): np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(model))
    }


@pytest.mark.parametrize("tied", [False, True])
def test_vocab_extension_keeps_old_outputs(world, tied):
    general = world.general_corpus(300)
    clinical = world.domain_corpus("clinical", 300)
    old_tok = tokenizers.train_sentencepiece(general, 400)
    pieces = domain.learn_domain_pieces(clinical, old_tok, 24, sp_vocab=500)
    assert len(pieces) == 24 and all(old_tok.piece_to_id(p) in (-1, old_tok.unk_id) for p in pieces)
    new_tok = tokenizers.extend_vocab(old_tok, pieces, user_defined=False)
    assert new_tok.vocab_size == old_tok.vocab_size + 24

    # The domain pieces shorten domain documents and every text still round-trips.
    n_old = np.mean([len(old_tok.encode(t)) for t in clinical[:50]])
    n_new = np.mean([len(new_tok.encode(t)) for t in clinical[:50]])
    assert n_new < 0.9 * n_old
    assert all(new_tok.decode(new_tok.encode(t)) == t for t in clinical[:20])

    cfg = presets.get_preset("micro").replace(vocab_size=old_tok.vocab_size, tie_embeddings=tied)
    old_model = Transformer(cfg, rngs=nnx.Rngs(0))
    subs = domain.sub_token_ids(old_tok, new_tok)
    flat = domain.extend_params(_flat(old_model), subs, new_tok.vocab_size)
    new_cfg = cfg.replace(vocab_size=new_tok.vocab_size)
    new_model = Transformer(new_cfg, rngs=nnx.Rngs(1))
    nnx.update(new_model, pretrained.place(flat, nnx.state(new_model)))

    # New rows are the mean of their old sub-token rows.
    emb_old, emb_new = _flat(old_model)["embed.embedding"], _flat(new_model)["embed.embedding"]
    i, ids = next(iter(subs.items()))
    assert len(ids) > 1
    np.testing.assert_allclose(emb_new[i], emb_old[ids].mean(0), rtol=1e-6)
    if not tied:
        head_old, head_new = _flat(old_model)["lm_head.kernel"], _flat(new_model)["lm_head.kernel"]
        np.testing.assert_allclose(head_new[:, i], head_old[:, ids].mean(1), rtol=1e-6)

    # Old tokens (inputs made of old ids) get exactly the old logits for the old vocabulary.
    tokens = np.asarray([old_tok.encode(t)[:32] for t in clinical[:4] + general[:4]], np.int32)
    old_logits = np.asarray(old_model(tokens))
    new_logits = np.asarray(new_model(tokens))
    assert new_logits.shape[-1] == new_tok.vocab_size
    np.testing.assert_allclose(new_logits[..., : old_tok.vocab_size], old_logits, atol=1e-5)


def test_domain_smoke_run(tmp_path):
    from fft import main

    # fft:micro + vocabulary extension
    config = config_lib.load_config(os.path.join(REPO, "configs", "domain.py"), "smoke")
    results = main.run(config, str(tmp_path))

    for split in ("before", "after"):
        for key in ("domain_ppl", "general_ppl", "tokens_per_doc", "domain_bpb"):
            assert np.isfinite(results[split][key]), (split, key)
    assert results["after"]["domain_bpb"] < results["before"]["domain_bpb"]
    # The base model with its own tokenizer is the reference; the new tokens shorten documents.
    assert results["base"]["tokens_per_doc"] > results["after"]["tokens_per_doc"]
    assert results["vocab"]["new"] > results["vocab"]["old"]
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["base"] == results["base"]
    assert (
        tokenizers.load_tokenizer(str(tmp_path / "tokenizer")).vocab_size == results["vocab"]["new"]
    )
    assert jax.device_count() == 8  # the run shards its batch over the 8 test devices


@pytest.mark.slow
def test_default_domain_run_keeps_general_ability(tmp_path):
    """The README's main job (fft:tiny, ~3 min on 2 cores): domain perplexity at most half of
    before, general perplexity (per token, per word and bits per byte) less than 1.1x before."""
    from fft import main

    config = config_lib.load_config(os.path.join(REPO, "configs", "domain.py"), "")
    before, after = (main.run(config, str(tmp_path))[k] for k in ("before", "after"))
    assert after["domain_token_ppl"] <= 0.5 * before["domain_token_ppl"]
    assert after["domain_ppl"] <= 0.5 * before["domain_ppl"]
    for key in ("general_token_ppl", "general_ppl", "general_bpb"):
        assert after[key] < 1.1 * before[key], key


@pytest.mark.parametrize("padded", [False, True])
def test_vocab_extension_pads_rows_to_128(world, tmp_path, padded):
    """Issue 17 #9: an extended vocabulary is padded to a multiple of 128 rows. The new ids of a
    padded base take over padding rows (as the mean of their sub-tokens, not the stale padding
    rows); a base without spare rows grows to the next multiple of 128, the rest masked."""
    from fft.train import lm

    old_tok = tokenizers.train_sentencepiece(world.general_corpus(300), 330)
    n_old = old_tok.vocab_size
    cfg = presets.get_preset("micro")
    cfg = cfg.with_vocab(n_old) if padded else cfg.replace(vocab_size=n_old)
    src = _flat(Transformer(cfg, rngs=nnx.Rngs(0)))
    base = lm.Base(cfg, old_tok, lambda a, s=None: pretrained.place(src, a, s, model_config=cfg))
    config = config_lib.load_config(os.path.join(REPO, "configs", "domain.py"), "smoke")
    config.domain.vocab.source, config.domain.vocab.new_tokens = "terms", 24
    tok, new_cfg, load, subs = domain._extend_vocab(config, str(tmp_path), base, [])
    n_new = tok.vocab_size
    assert n_new == n_old + len(subs) and len(subs) > 0
    rows = -(-n_new // 128) * 128
    assert (new_cfg.vocab_size, new_cfg.n_tokens) == (rows, n_new)
    model = Transformer(new_cfg, rngs=nnx.Rngs(1))
    nnx.update(model, load(nnx.state(model), None))
    emb = _flat(model)["embed.embedding"]
    np.testing.assert_array_equal(emb[:n_old], src["embed.embedding"][:n_old])
    for i, ids in subs.items():
        np.testing.assert_allclose(
            emb[i], src["embed.embedding"][ids].mean(0), rtol=1e-5, atol=1e-8
        )
    tokens = np.asarray([tok.encode(t)[:16] for t in world.general_corpus(2)], np.int32)
    logits = np.asarray(model(tokens))
    assert logits.shape[-1] == rows and (logits.argmax(-1) < n_new).all()
    assert logits[..., n_new:].max() < -1e8 < logits[..., :n_new].min()


def test_pydocs_general_source_is_held_out_real_text():
    from fft.data import pydocs

    config = config_lib.load_config(os.path.join(REPO, "configs", "domain.py"), "smollm2")
    assert config.domain.general_source == "pydocs"
    general = domain._general_corpora(config)
    assert general["general_train"] == pydocs.texts("train", limit=config.domain.general_docs)
    assert general["general_eval"] == pydocs.texts("eval", limit=config.domain.eval_docs)
    # No eval text is replayed in training.
    assert not set(general["general_eval"]) & set(pydocs.texts("train"))
    assert domain.general_source_name(config).startswith("pydoc:stdlib-docstrings:eval (CPython")
    config.domain.general_source = "wikipedia"
    with pytest.raises(config_lib.ConfigError, match="general_source='wikipedia'"):
        domain._general_corpora(config)


def test_smoke_run_with_pydocs_names_the_general_source(tmp_path):
    from fft import main

    config = config_lib.load_config(os.path.join(REPO, "configs", "domain.py"), "smoke")
    config.domain.general_source = "pydocs"
    config.domain.vocab.extend = False  # the plain path; the smoke test covers extension
    results = main.run(config, str(tmp_path))
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["general_source"].startswith("pydoc:stdlib-docstrings:eval")
    assert saved["eval_docs"]["general"] > 0
    assert np.isfinite(results["after"]["general_ppl"])
