"""Tokenizers: sentencepiece training, roundtrip, save/load, vocab extension, HF tokenizer.json."""

import json
import random

import pytest

from fft.config_lib import FFTError
from fft.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    extend_vocab,
    load_tokenizer,
    train_sentencepiece,
)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _texts(n=300):
    rng = random.Random(1)
    return [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n)]


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return train_sentencepiece(_texts(), 300, str(tmp_path_factory.mktemp("sp")))


def test_train_roundtrip_and_specials(sp):
    assert isinstance(sp, Tokenizer)
    assert (sp.pad_id, sp.bos_id, sp.eos_id) == (0, 2, 3)
    for text in ["alpha beta gamma", "  spaces\n\ttabs  ", "unseen ünïcödé 漢字 🙂", ""]:
        assert sp.decode(sp.encode(text)) == text
    ids = sp.encode("alpha", add_bos=True, add_eos=True)
    assert ids[0] == sp.bos_id and ids[-1] == sp.eos_id


def test_training_is_deterministic(sp, tmp_path):
    again = train_sentencepiece(_texts(), 300, None)
    assert again.model_proto == sp.model_proto


def test_save_load(sp, tmp_path):
    sp.chat_template = "{{ messages }}"
    sp.save(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.encode("beta gamma") == sp.encode("beta gamma")
    assert loaded.chat_template == "{{ messages }}"
    sp.chat_template = None


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FFTError, match="nope"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FFTError, match="no tokenizer in directory"):
        load_tokenizer(str(tmp_path))


def test_vocab_extension_keeps_old_ids(sp):
    text = "alpha hemoglobin beta"
    ext = extend_vocab(sp, ["hemoglobin", "alpha", "thrombocyte"])
    assert ext.vocab_size == sp.vocab_size + 2  # 'alpha' may already exist as a piece
    for i in range(sp.vocab_size):
        assert ext.id_to_piece(i) == sp.id_to_piece(i)
    new_id = ext.piece_to_id("hemoglobin")
    assert new_id >= sp.vocab_size
    assert new_id in ext.encode(text)
    assert ext.decode(ext.encode(text)) == text
    assert sp.encode("gamma delta") == ext.encode("gamma delta")
    normal = sp.add_tokens(["▁thrombocyte"], user_defined=False)
    assert normal.piece_to_id("▁thrombocyte") == sp.vocab_size


def _hf_dir(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(_texts(), trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": {"content": "</s>"},
        "pad_token": "<pad>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_hf_tokenizer(tmp_path):
    d = _hf_dir(tmp_path)
    tok = load_tokenizer(str(d))
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.chat_template.startswith("{% for")
    ids = tok.encode("alpha beta", add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 3
    assert tok.decode(ids) == "alpha beta"
    ext = tok.add_tokens(["hemoglobin"])
    assert ext.piece_to_id("hemoglobin") == tok.vocab_size
    assert ext.encode("alpha beta") == tok.encode("alpha beta")
    out = tmp_path / "saved"
    ext.save(str(out))
    again = load_tokenizer(str(out / "tokenizer.json"))
    assert again.vocab_size == ext.vocab_size and again.chat_template == tok.chat_template
