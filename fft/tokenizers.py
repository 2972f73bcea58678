"""One Tokenizer protocol over sentencepiece `.model` files and HuggingFace `tokenizer.json`.

- `SentencePieceTokenizer`: wraps a serialized sentencepiece ModelProto. `train_sentencepiece`
  trains one in-process from an iterator of texts (deterministic: one thread, no sampling), with
  fixed special ids `pad=0, unk=1, bos=2, eos=3` and `byte_fallback=True` so that any text encodes.
- `HFTokenizer`: wraps a `tokenizers.Tokenizer` (`tokenizer.json`); specials and the
  `chat_template` come from `tokenizer_config.json` when present.
- Domain vocabulary extension (`extend_vocab` / `Tokenizer.add_tokens`) appends new pieces at the
  END of the vocab, so every old id keeps its meaning and its embedding row.

A tokenizer directory holds either `tokenizer.model` or `tokenizer.json`, plus an optional
`tokenizer_config.json` (`{"chat_template": ..., "bos_token": ..., ...}`, HF layout).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from fft.config_lib import FFTError

# Special ids of every sentencepiece model fft trains. pad=0 so zero-filled arrays are padding.
SP_PAD_ID, SP_UNK_ID, SP_BOS_ID, SP_EOS_ID = 0, 1, 2, 3
_CONFIG_FILE = "tokenizer_config.json"


@runtime_checkable
class Tokenizer(Protocol):
    """What every fft component may rely on. Ids that a tokenizer lacks are -1."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    chat_template: str | None

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str) -> None: ...


def _with_specials(ids: list[int], bos: int, eos: int, add_bos: bool, add_eos: bool) -> list[int]:
    if add_bos and bos >= 0:
        ids = [bos] + ids
    if add_eos and eos >= 0:
        ids = ids + [eos]
    return ids


def _read_config(directory: str) -> dict:
    """`tokenizer_config.json` of `directory` ({} if absent), plus `chat_template.jinja`."""
    path = os.path.join(directory, _CONFIG_FILE)
    config = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise FFTError(f"{path}: not valid JSON ({e})") from None
    jinja = os.path.join(directory, "chat_template.jinja")
    if not config.get("chat_template") and os.path.exists(jinja):
        # transformers >= 5 saves the template in its own file, not in tokenizer_config.json.
        with open(jinja, encoding="utf-8") as f:
            config["chat_template"] = f.read()
    return config


# ------------------------------------------------------------------------------------------------
# sentencepiece
# ------------------------------------------------------------------------------------------------


class SentencePieceTokenizer:
    """A sentencepiece model. Build with `from_file`, `from_bytes` or `train_sentencepiece`."""

    def __init__(self, model_proto: bytes, *, chat_template: str | None = None):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        self.pad_id = int(self._sp.pad_id())
        self.unk_id = int(self._sp.unk_id())
        self.chat_template = chat_template
        # Special token strings, so rendered chat templates can name them in text.
        self.special_tokens = {
            self._sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.pad_id) if i >= 0
        }

    @classmethod
    def from_file(cls, path: str) -> SentencePieceTokenizer:
        if not os.path.exists(path):
            raise FFTError(f"tokenizer file not found: {path}")
        with open(path, "rb") as f:
            proto = f.read()
        config = _read_config(os.path.dirname(os.path.abspath(path)))
        return cls(proto, chat_template=config.get("chat_template"))

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return _with_specials(
            self._sp.encode(text, out_type=int), self.bos_id, self.eos_id, add_bos, add_eos
        )

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts in one C++ call (faster than a Python loop)."""
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return int(self._sp.piece_to_id(piece))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
            f.write(self._proto)
        config = {"tokenizer_class": "sentencepiece"}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        with open(os.path.join(directory, _CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1)

    def add_tokens(self, pieces: Iterable[str], *, user_defined: bool = True):
        """A new tokenizer with `pieces` appended at the end of the vocab (see extend_vocab)."""
        return extend_vocab(self, pieces, user_defined=user_defined)


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    directory: str | None = None,
    *,
    user_defined_symbols: Sequence[str] = (),
    model_type: str = "unigram",
    chat_template: str | None = None,
) -> SentencePieceTokenizer:
    """Trains a sentencepiece model in-process and (optionally) saves it to `directory`.

    Deterministic for the same texts: one thread, the whole input used, no sentence shuffling.
    Whitespace is kept as is and no dummy prefix is added, so encoding a prompt and a response
    separately and concatenating gives the same pieces a generator would produce.

    Args:
      texts: training sentences/documents (an iterator is fine; it is consumed once).
      vocab_size: target vocabulary size, including the 4 specials and the 256 byte pieces.
      directory: where to write `tokenizer.model` (+ config); None keeps it in memory only.
      user_defined_symbols: pieces always kept whole (chat role markers, domain terms).
      model_type: 'unigram' or 'bpe'.
      chat_template: optional jinja chat template stored with the tokenizer.

    Returns:
      The trained SentencePieceTokenizer.
    """
    import sentencepiece as spm

    if vocab_size < 256 + 4 + len(user_defined_symbols) + 8:
        raise FFTError(
            f"train_sentencepiece: vocab_size={vocab_size} is too small; byte fallback needs "
            f"256 byte pieces + 4 specials + {len(user_defined_symbols)} user symbols + a few more"
        )
    model = io.BytesIO()
    try:
        _train(spm, texts, model, vocab_size, user_defined_symbols, model_type)
    except RuntimeError as e:  # e.g. no text at all: sentencepiece's message, not a traceback
        raise FFTError(f"train_sentencepiece: sentencepiece failed: {e!s:.300}") from None
    tok = SentencePieceTokenizer(model.getvalue(), chat_template=chat_template)
    if directory is not None:
        tok.save(directory)
    return tok


def _train(spm, texts, model, vocab_size, user_defined_symbols, model_type) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in texts if t),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=SP_PAD_ID,
        unk_id=SP_UNK_ID,
        bos_id=SP_BOS_ID,
        eos_id=SP_EOS_ID,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        user_defined_symbols=list(user_defined_symbols),
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        # Chat markers and code need '\n' etc.; these flags keep training deterministic.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )


def extend_vocab(tokenizer, pieces: Iterable[str], *, user_defined: bool = True):
    """Domain vocabulary extension: a new tokenizer with `pieces` appended after the old vocab.

    Old ids are unchanged (the model's embedding matrix only grows at the end). Pieces already in
    the vocab are skipped. For sentencepiece, `user_defined=True` makes each new piece a
    USER_DEFINED symbol (always matched whole in raw text); `False` adds NORMAL pieces whose score
    equals the best existing score so unigram segmentation prefers them. Spaces in a piece should
    be written as '▁' for NORMAL pieces. For HF tokenizers the pieces become added tokens.

    Args:
      tokenizer: a SentencePieceTokenizer or HFTokenizer.
      pieces: the new tokens.
      user_defined: see above (sentencepiece only).

    Returns:
      A new tokenizer of the same type; `tokenizer` itself is not modified.
    """
    pieces = list(dict.fromkeys(p for p in pieces if p))
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.add_tokens(pieces)
    if not isinstance(tokenizer, SentencePieceTokenizer):
        raise FFTError(f"extend_vocab: unsupported tokenizer type {type(tokenizer).__name__}")
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    existing = {p.piece for p in proto.pieces}
    top_score = max((p.score for p in proto.pieces if p.type == p.NORMAL), default=0.0)
    for piece in pieces:
        if piece in existing:
            continue
        new = proto.pieces.add()
        new.piece = piece
        new.score = 0.0 if user_defined else top_score
        new.type = new.USER_DEFINED if user_defined else new.NORMAL
    return SentencePieceTokenizer(proto.SerializeToString(), chat_template=tokenizer.chat_template)


# ------------------------------------------------------------------------------------------------
# HuggingFace tokenizer.json
# ------------------------------------------------------------------------------------------------


def _token_str(value) -> str | None:
    """tokenizer_config.json gives specials as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """A HuggingFace fast tokenizer (`tokenizer.json`) with specials from `tokenizer_config.json`.

    BERT-style tokenizers without bos/eos use `[CLS]` as bos and `[SEP]` as eos.
    `encode` never applies the tokenizer's own post-processor; `add_bos/add_eos` add specials.
    """

    def __init__(self, tok, config: dict | None = None):
        # tokenizer.json may carry fixed padding / truncation (MiniLM: pad to 128); `encode`
        # returns the text's own ids, and the data pipeline pads and truncates.
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self._config = dict(config or {})
        c = self._config

        def token_id(*keys) -> int:
            for key in keys:
                s = _token_str(c.get(key))
                if s is not None and tok.token_to_id(s) is not None:
                    return int(tok.token_to_id(s))
            return -1

        self.bos_id = token_id("bos_token", "cls_token")
        self.eos_id = token_id("eos_token", "sep_token")
        self.pad_id = token_id("pad_token")
        self.unk_id = token_id("unk_token")
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.chat_template = c.get("chat_template")
        self.special_tokens = {
            s: int(tok.token_to_id(s))
            for s in (_token_str(c.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
            if s is not None and tok.token_to_id(s) is not None
        }

    @classmethod
    def from_file(cls, path: str) -> HFTokenizer:
        import tokenizers

        if not os.path.exists(path):
            raise FFTError(f"tokenizer file not found: {path}")
        config = _read_config(os.path.dirname(os.path.abspath(path)))
        if isinstance(config.get("chat_template"), list):
            # Newer HF configs hold a list of named templates; the default one is 'default'.
            named = {t.get("name"): t.get("template") for t in config["chat_template"]}
            config["chat_template"] = named.get("default")
        return cls(tokenizers.Tokenizer.from_file(path), config)

    @property
    def backend(self):
        """The wrapped `tokenizers.Tokenizer` (read it; changing it changes this tokenizer)."""
        return self._tok

    @property
    def config(self) -> dict:
        """A copy of the `tokenizer_config.json` entries this tokenizer was built with."""
        return dict(self._config)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return _with_specials(list(ids), self.bos_id, self.eos_id, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def piece_to_id(self, piece: str) -> int:
        i = self._tok.token_to_id(piece)
        return -1 if i is None else int(i)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        config = dict(self._config)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        with open(os.path.join(directory, _CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1)

    def add_tokens(self, pieces: Iterable[str], *, user_defined: bool = True) -> HFTokenizer:
        """A new tokenizer with `pieces` as added tokens at the end of the vocab."""
        import tokenizers

        del user_defined  # HF added tokens are always matched whole
        tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
        tok.add_tokens([p for p in pieces if tok.token_to_id(p) is None])
        return HFTokenizer(tok, self._config)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


class VocabMismatchError(FFTError):
    """A tokenizer whose ids do not fit the model's embedding."""


def check_fits(tokenizer, vocab_size: int, *, tokenizer_name: str, model_name: str) -> None:
    """Raises VocabMismatchError when `tokenizer` makes ids the model has no embedding row for.

    A model may have more rows than the tokenizer has ids (vocabularies padded to a multiple of
    64 or 128); one with fewer would look up rows that do not exist, and JAX clamps an index
    out of range instead of failing, so such a pair trains on garbage without a word.

    Args:
      tokenizer: the tokenizer (None: a model that ships none; nothing to check).
      vocab_size: the model's vocabulary size (embedding rows).
      tokenizer_name: where the tokenizer came from (a path), for the message.
      model_name: where the model's config came from (a path), for the message.
    """
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise VocabMismatchError(
            f"tokenizer {tokenizer_name} has {tokenizer.vocab_size} tokens but the model "
            f"{model_name} has vocab_size={vocab_size}: ids {vocab_size} and up have no "
            "embedding row. Use the tokenizer the model was trained with."
        )


def load_tokenizer(path: str) -> SentencePieceTokenizer | HFTokenizer:
    """Loads a `.model` file, a `tokenizer.json`, or a directory holding one of them.

    Raises:
      FFTError naming the path when nothing loadable is there.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FFTError(f"tokenizer not found: {path}")
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.model"):
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        models = sorted(n for n in os.listdir(path) if n.endswith(".model"))
        if models:
            return load_tokenizer(os.path.join(path, models[0]))
        raise FFTError(
            f"no tokenizer in directory {path}: expected tokenizer.json or a sentencepiece .model"
        )
    if path.endswith(".json"):
        return HFTokenizer.from_file(path)
    return SentencePieceTokenizer.from_file(path)
