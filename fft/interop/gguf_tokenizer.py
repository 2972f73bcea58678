"""The tokenizer a GGUF's metadata describes <-> an fft tokenizer.

A GGUF has no `tokenizer.json`: it stores the vocabulary (`tokenizer.ggml.tokens`, one type
per token), the BPE merges, the special ids, the chat template, and the name of llama.cpp's
pre-tokenizer (`tokenizer.ggml.pre`, a regex llama.cpp hard-codes). `from_gguf` rebuilds a
HuggingFace `tokenizers.Tokenizer` from them (byte-level BPE: the pre-tokenizer of `_PRE`, a
ByteLevel decoder, control tokens as special added tokens) and wraps it in fft's HFTokenizer.
Gemma's files hold a sentencepiece-style (`llama`) vocabulary without merges; `_gemma_bpe`
rebuilds it as transformers' GGUF reader does (BPE with byte fallback, spaces as U+2581, merges
recovered from the vocabulary in file order), so both give the same ids.

`write` does the reverse for `fft.interop.gguf_export`: a byte-level BPE HFTokenizer becomes
llama.cpp's `gpt2` tokenizer model; a sentencepiece tokenizer (fft's own) becomes its `llama`
model (pieces, scores, types), with the serialized model proto under `fft.tokenizer.spm` so
fft reads back exactly the tokenizer it wrote.
"""

from __future__ import annotations

import base64
import json
import logging
import re

from fft import tokenizers as fft_tokenizers
from fft.config_lib import FFTError

log = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType; sentencepiece numbers its piece types the same way).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # sentencepiece's byte-fallback pieces
_SPM_KEY = "fft.tokenizer.spm"  # base64 sentencepiece ModelProto, written by fft only

# The splitting regexes llama.cpp applies before BPE (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str):
    """(normalizer, pre_tokenizer) of llama.cpp pre-tokenizer `pre` (GPT-2's for unknown)."""
    from tokenizers import Regex, normalizers
    from tokenizers import pre_tokenizers as pt

    def split(regex):
        return pt.Sequence(
            [
                pt.Split(Regex(regex), behavior="isolated"),
                pt.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    gpt2 = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's own tokenizer.json: each digit alone, then GPT-2's regex
        return None, pt.Sequence([pt.Digits(individual_digits=True), gpt2])
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return normalizers.NFC(), split(_QWEN2_SPLIT)
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe"):
        return None, split(_LLAMA3_SPLIT)
    if pre not in ("gpt2", "default", "", None):
        log.warning("GGUF pre-tokenizer %r is not known to fft; splitting as GPT-2 does", pre)
    return None, gpt2


_PRE_NAMES = ("smollm", "qwen2", "llama-bpe", "gpt2")  # what `write` can recognise


def from_gguf(g) -> fft_tokenizers.Tokenizer | None:
    """The fft tokenizer of an opened `fft.interop.gguf.GGUFFile` (None if it stores none).

    Raises:
      FFTError for tokenizer models fft cannot rebuild yet (sentencepiece-style `llama` files
      that neither fft wrote nor a Gemma model carries, e.g. Llama 2's).
    """
    kind = g.value("tokenizer.ggml.model")
    if kind is None:
        log.warning("%s has no tokenizer metadata; continuing without a tokenizer", g.path)
        return None
    chat_template = g.value("tokenizer.chat_template")
    if kind == "llama" and g.value(_SPM_KEY):
        proto = base64.b64decode(g.value(_SPM_KEY))
        return fft_tokenizers.SentencePieceTokenizer(proto, chat_template=chat_template)
    gemma = kind == "llama" and str(g.arch).startswith("gemma")
    if kind != "gpt2" and not gemma:
        raise FFTError(
            f"{g.path}: GGUF tokenizer model {kind!r} is not supported yet; fft rebuilds "
            "byte-level BPE ('gpt2') tokenizers and Gemma's sentencepiece-style ones."
        )
    tokens = list(g.value("tokenizer.ggml.tokens"))
    types = list(g.value("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    if gemma:
        unk = g.value("tokenizer.ggml.unknown_token_id")
        tok = _gemma_bpe(tokens, types, tokens[int(unk)] if unk is not None else "<unk>")
    else:
        merges = [tuple(m.split(" ", 1)) for m in g.value("tokenizer.ggml.merges", [])]
        tok = _byte_level_bpe(tokens, types, merges, g.value("tokenizer.ggml.pre"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        i = g.value(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            config[f"{name}_token"] = tokens[int(i)]
    for flag in ("add_bos_token", "add_eos_token"):
        value = g.value(f"tokenizer.ggml.{flag}")
        if value is not None:
            config[flag] = bool(value)
    if chat_template:
        config["chat_template"] = chat_template
    return fft_tokenizers.HFTokenizer(tok, config)


def _gemma_bpe(tokens: list[str], types: list[int], unk: str):
    """Gemma's vocabulary as a `tokenizers` BPE (transformers' `gemma_tokenizer` +
    `GemmaTokenizer`, so the ids agree with `AutoTokenizer.from_pretrained(gguf_file=...)`).

    Two things the file leaves to the reader: tokens of two or more spaces are stored as real
    spaces but looked up as U+2581 runs (respelled here), and there are no merges: every split
    of a token into two tokens is a merge, ranked by the token's position in the file (Gemma's
    scores do not follow its merge order), then by the pieces' lengths.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pt

    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated spelling: its last id, as HF
    ranked = []
    for merged, index in vocab.items():
        pairs = [
            (merged[:k], merged[k:])
            for k in range(1, len(merged))
            if merged[:k] in vocab and merged[k:] in vocab
        ]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked += [(index, len(a), len(b), a, b) for a, b in pairs]
    # transformers sorts (-index, len a, len b) descending, stably: file order first, then the
    # longer left piece, then the longer right piece; ties keep their insertion order.
    ranked.sort(key=lambda m: (m[0], -m[1], -m[2]))
    merges = [(a, b) for *_, a, b in ranked]
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pt.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    special = [t for t, k in zip(tokens, types, strict=True) if k == _CONTROL]
    added = [t for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return tok


def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[tuple], pre: str | None):
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer, tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> ...) and user-defined ones are matched whole in raw text,
    # as llama.cpp does; without this BPE would cut them into pieces.
    special = [t for t, k in zip(tokens, types, strict=True) if k == _CONTROL]
    added = [t for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return tok


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write(writer, tokenizer) -> None:
    """Adds `tokenizer`'s metadata to a `gguf.GGUFWriter` (llama.cpp's keys).

    Args:
      writer: an open gguf.GGUFWriter (before its header is written).
      tokenizer: an fft HFTokenizer (byte-level BPE) or SentencePieceTokenizer.

    Raises:
      FFTError for a tokenizer GGUF cannot describe (e.g. WordPiece).
    """
    if isinstance(tokenizer, fft_tokenizers.SentencePieceTokenizer):
        _write_sentencepiece(writer, tokenizer)
    elif isinstance(tokenizer, fft_tokenizers.HFTokenizer) and _is_gemma(tokenizer):
        _write_gemma(writer, tokenizer)
    elif isinstance(tokenizer, fft_tokenizers.HFTokenizer):
        _write_bpe(writer, tokenizer)
    else:
        raise FFTError(f"cannot write a {type(tokenizer).__name__} into a GGUF file")
    for key, value in (
        ("bos", tokenizer.bos_id),
        ("eos", tokenizer.eos_id),
        ("pad", tokenizer.pad_id),
        ("unk", getattr(tokenizer, "unk_id", -1)),
    ):
        if value is not None and value >= 0:
            getattr(writer, f"add_{key}_token_id")(int(value))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _write_bpe(writer, tokenizer) -> None:
    state = json.loads(tokenizer.backend.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise FFTError(f"GGUF export needs a BPE tokenizer, not {model.get('type')!r}")
    n = tokenizer.vocab_size
    tokens, types = [f"[PAD{i}]" for i in range(n)], [_UNUSED] * n
    for t, i in model["vocab"].items():
        tokens[i], types[i] = t, _NORMAL
    for added in state.get("added_tokens", []):
        i = added["id"]
        tokens[i], types[i] = added["content"], _CONTROL if added["special"] else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_name(state.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = getattr(tokenizer, "config", {})
    writer.add_add_bos_token(bool(config.get("add_bos_token", False)))


def _is_gemma(tokenizer) -> bool:
    """Whether an HFTokenizer is Gemma's shape (`_gemma_bpe`): BPE with byte fallback over
    U+2581-for-space text."""
    state = json.loads(tokenizer.backend.to_str())
    norm = state.get("normalizer") or {}
    return (
        state["model"].get("type") == "BPE"
        and bool(state["model"].get("byte_fallback"))
        and norm.get("type") == "Replace"
        and norm.get("content") == "\u2581"
    )


def _write_gemma(writer, tokenizer) -> None:
    """Gemma's vocabulary as llama.cpp's `llama` (sentencepiece) model. Scores are `-id`: the
    merge order of `_gemma_bpe` (file order), which llama.cpp's highest-score-first merging
    then follows too."""
    state = json.loads(tokenizer.backend.to_str())
    n = tokenizer.vocab_size
    tokens, types = [f"[PAD{i}]" for i in range(n)], [_UNUSED] * n
    for t, i in state["model"]["vocab"].items():
        tokens[i], types[i] = t, _BYTE if _BYTE_PIECE.fullmatch(t) else _NORMAL
    for added in state.get("added_tokens", []):
        i = added["id"]
        tokens[i], types[i] = added["content"], _CONTROL if added["special"] else _USER_DEFINED
    unk = state["model"].get("unk_token")
    if unk in state["model"]["vocab"]:
        types[state["model"]["vocab"][unk]] = _UNKNOWN
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(n)])
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)
    config = getattr(tokenizer, "config", {})
    writer.add_add_bos_token(bool(config.get("add_bos_token", True)))


def _pre_name(pre_state) -> str:
    """The llama.cpp pre-tokenizer name whose rebuild equals `pre_state` ('gpt2' otherwise)."""
    for name in _PRE_NAMES:
        built = _pre_tokenizer(name)[1]
        if json.loads(built.__getstate__()) == pre_state:
            return name
    log.warning("tokenizer's pre-tokenizer matches none of %s; writing 'gpt2'", _PRE_NAMES)
    return "gpt2"


def _write_sentencepiece(writer, tokenizer) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([float(p.score) for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])
    writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    writer.add_add_bos_token(False)
    # llama.cpp's `llama` model approximates sentencepiece from scores; fft reads this back.
    writer.add_string(_SPM_KEY, base64.b64encode(tokenizer.model_proto).decode("ascii"))
