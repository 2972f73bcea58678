"""Domain adaptation: continued pretraining on a domain corpus, with replay of general text.

    data     mixture [domain, general] with weights [1 - replay, replay]   (next-token loss)
    init     config.init_from (fft:tiny, an fft workdir or a local HF model), full / LoRA / regex
    vocab    optional extension: domain pieces learned with sentencepiece on the domain corpus are
             appended to the tokenizer; the embedding and the output layer grow by as many rows,
             each new row the mean of the rows of the old sub-tokens the piece replaces. Old ids
             keep their rows, so the old tokens' logits are unchanged (tested).
    evals    domain_ppl, general_ppl (retention) and tokens_per_doc, before and after.

Perplexities are PER WORD: exp(total NLL of a document set / its number of whitespace words),
where the NLL sums every target token of each whole document (its text and the closing eos).
Per-token perplexity cannot compare two tokenizers (fewer, rarer tokens have a higher per-token
ppl for the same text); per-word and per-byte can. `*_bpb` (bits per UTF-8 byte) and
`*_token_ppl` (the model's own tokens) are reported beside them. Eval documents are the ones that
fit one row (`domain.eval_seq_len`) under both the old and the new tokenizer, so every document
is scored whole, with the same text under either tokenizer.
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft import config_lib, sharding, tokenizers
from fft.data import pipeline, pydocs, sources
from fft.data.synthetic import World
from fft.models.transformer import Transformer
from fft.train import lm, losses
from fft.train.recipe import ModelSpec, Recipe, lm_batch_spec

# =============================================================================================
# Data
# =============================================================================================


def _texts(spec: str, fallback, on_bad_record: str) -> list[str]:
    """Texts of a data spec (JSONL with a 'text' field, ...), or `fallback()` when spec is ''."""
    if not spec:
        return list(fallback())
    src = sources.open_source(spec, on_bad_record=on_bad_record)
    out = []
    for i in range(len(src)):
        record = src[i]
        if record is None:
            continue
        if not isinstance(record.get("text"), str):
            raise sources.BadRecordError(f"{src.origin(i)}: record has no string field 'text'")
        out.append(record["text"])
    return out


def _corpora(config) -> dict[str, list[str]]:
    d, world = config.domain, World(config.domain.world_seed)
    bad = config.data.on_bad_record
    return {
        "domain_train": _texts(
            config.data.train, lambda: world.domain_corpus(d.name, d.train_docs), bad
        ),
        "domain_eval": _texts(
            config.data.eval, lambda: world.domain_corpus(d.name, d.eval_docs, "test"), bad
        ),
        **_general_corpora(config),
    }


# Where general text (replay and the general_ppl eval) comes from when no data spec is given.
GENERAL_SOURCES = ("synthetic", "pydocs")


def _general_corpora(config) -> dict[str, list[str]]:
    """{general_train, general_eval}: the replay texts and the held-out general eval texts.

    `domain.general_source`: 'synthetic' (the synthetic world's general corpus, which fft:tiny
    was pretrained on) or 'pydocs' (real English: CPython standard-library docstrings, split by
    module, `fft.data.pydocs`). `domain.general_train` / `general_eval` data specs override it.
    """
    d, bad = config.domain, config.data.on_bad_record
    source = d.get("general_source", "synthetic")
    if source == "synthetic":
        world = World(d.world_seed)
        train, held_out = (lambda: world.general_corpus(d.general_docs),
                           lambda: world.general_corpus(d.eval_docs, "test"))  # fmt: skip
    elif source == "pydocs":
        train, held_out = (lambda: pydocs.texts("train", limit=d.general_docs),
                           lambda: pydocs.texts("eval", limit=d.eval_docs))  # fmt: skip
    else:
        raise config_lib.ConfigError(
            f"config.domain.general_source={source!r}: choose one of {GENERAL_SOURCES}."
        )
    return {
        "general_train": _texts(d.general_train, train, bad),
        "general_eval": _texts(d.general_eval, held_out, bad),
    }


def general_source_name(config) -> str:
    """The name of the general eval text, for results.json (`general_source`)."""
    d = config.domain
    if d.general_eval:
        return d.general_eval
    if d.get("general_source", "synthetic") == "pydocs":
        return pydocs.source_name("eval")
    return f"synthetic:general_corpus:test (World(seed={d.world_seed}))"


# =============================================================================================
# Vocabulary extension
# =============================================================================================


def learn_domain_pieces(texts, tokenizer, n_new: int, *, sp_vocab: int = 2048,
                        min_chars: int = 3) -> list[str]:  # fmt: skip
    """The `n_new` most likely pieces of a sentencepiece model trained on `texts` that the old
    tokenizer lacks (pieces of at least `min_chars` characters, not counting the space mark).

    Returns:
      Pieces in sentencepiece notation ('▁' = a leading space), most probable first.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb2

    texts = list(texts)
    # The domain model may come out smaller than asked on a small corpus (hard_vocab_limit off).
    sp = tokenizers.train_sentencepiece(texts, sp_vocab, None)
    proto = pb2.ModelProto.FromString(sp.model_proto)
    old = {tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)}
    cands = [
        (p.score, p.piece)
        for p in proto.pieces
        if p.type == p.NORMAL and p.piece not in old and len(p.piece.replace("▁", "")) >= min_chars
    ]
    cands.sort(key=lambda sp_: (-sp_[0], sp_[1]))
    return [piece for _, piece in cands[:n_new]]


def sub_token_ids(old_tokenizer, new_tokenizer) -> dict[int, list[int]]:
    """{new id: the old ids its piece encodes to} for every id the new tokenizer added."""
    out = {}
    for i in range(old_tokenizer.vocab_size, new_tokenizer.vocab_size):
        text = new_tokenizer.id_to_piece(i).replace("▁", " ")
        out[i] = old_tokenizer.encode(text) or [old_tokenizer.unk_id]
    return out


def extend_params(flat: dict[str, np.ndarray], subs: dict[int, list[int]],
                  new_vocab: int) -> dict[str, np.ndarray]:  # fmt: skip
    """Grows `embed.embedding [V,D]` and `lm_head.kernel [D,V]` to `new_vocab` rows / columns.

    Row (column) i of a new token is the mean of the rows (columns) of its old sub-tokens
    `subs[i]`; rows past the old ones and not in `subs` (padding) start at zero. Old rows are
    copied unchanged (an old padding row that becomes a new token is then overwritten), so for
    inputs made of old ids the old logits are exactly the same.
    """
    out = dict(flat)
    new_ids = np.asarray(sorted(subs), np.int32)
    width = max((len(v) for v in subs.values()), default=1)
    ids = np.zeros((len(new_ids), width), np.int32)
    mask = np.zeros((len(new_ids), width), np.float32)
    for r, i in enumerate(new_ids):
        ids[r, : len(subs[int(i)])] = subs[int(i)]
        mask[r, : len(subs[int(i)])] = 1.0
    for name, axis in (("embed.embedding", 0), ("lm_head.kernel", 1)):
        if name not in flat:
            continue  # tied embeddings: the output layer is the embedding
        # jnp on the (sharded) loaded arrays: the rows grow on the devices, never on one host.
        w = jnp.moveaxis(jnp.asarray(flat[name]), axis, 0)
        grown = jnp.zeros((new_vocab,) + w.shape[1:], w.dtype).at[: w.shape[0]].set(w)
        if len(new_ids):
            means = (w[ids] * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
            grown = grown.at[new_ids].set(means.astype(w.dtype))
        out[name] = jnp.moveaxis(grown, 0, axis)
    return out


def _extended_loader(base: lm.Base, old_cfg, subs, new_vocab: int):
    """A `load_weights` that reads the base at its own vocab size, then grows the vocab rows."""

    def load_weights(abstract_state, shardings=None):
        # The base is read at its own vocabulary size, sharded like the run's model (the
        # Trainer re-places what this returns with the state's shardings).
        old_abstract = nnx.state(nnx.eval_shape(lambda: Transformer(old_cfg, rngs=nnx.Rngs(0))))
        active = sharding.current()
        old_sh = None
        if shardings is not None and active is not None:
            old_sh = sharding.state_shardings(old_abstract, active[0], tuple(active[1].items()))
        loaded = base.load_weights(old_abstract, old_sh)
        flat = {".".join(map(str, p)): v.value for p, v in nnx.to_flat_state(loaded)}
        flat = extend_params(flat, subs, new_vocab)
        leaves = {}
        for path, var in nnx.to_flat_state(abstract_state):
            arr = flat.get(".".join(map(str, path)))
            if arr is not None and tuple(arr.shape) == tuple(var.value.shape):
                leaves[path] = var.replace(jnp.asarray(arr, var.value.dtype))
        return nnx.from_flat_state(leaves)

    return load_weights


def _extend_vocab(config, workdir, base: lm.Base, domain_texts):
    """(tokenizer, model_config, load_weights, subs) with the domain pieces added."""
    old_tok = base.tokenizer
    saved = os.path.join(workdir, "tokenizer") if workdir else ""
    if saved and os.path.isdir(saved):  # a resumed run: the tokenizer it started with
        new_tok = tokenizers.load_tokenizer(saved)
    else:
        v = config.domain.vocab
        if v.source == "terms":
            pieces = [t for t in World(config.domain.world_seed).domain_terms(config.domain.name)]
            pieces = ["▁" + t for t in pieces][: v.new_tokens]
        else:
            pieces = learn_domain_pieces(domain_texts, old_tok, v.new_tokens, sp_vocab=v.sp_vocab)
        # NORMAL pieces scored like the best old piece: unigram segmentation then prefers them.
        new_tok = tokenizers.extend_vocab(old_tok, pieces, user_defined=False)
    subs = sub_token_ids(old_tok, new_tok)
    old_cfg = base.model_config
    n_tokens = max(old_cfg.n_tokens, new_tok.vocab_size)
    if n_tokens > old_cfg.vocab_size:
        # Grown rows are padded to a multiple of 128 (ModelConfig.with_vocab says why).
        model_config = old_cfg.with_vocab(n_tokens)
    else:
        # The new ids fit the padding rows (or a HF model's spare rows): they stop being masked.
        model_config = old_cfg.replace(real_vocab_size=n_tokens)
    load = _extended_loader(base, old_cfg, subs, model_config.vocab_size)
    return new_tok, model_config, load, subs


# =============================================================================================
# Evals: per-word / per-byte perplexity over whole documents
# =============================================================================================


@functools.lru_cache(maxsize=8)
def _nll_fn(vocab_limit: int | None):
    @nnx.jit
    def nll(model, batch):
        hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        unembed = model.logits
        if vocab_limit is not None:  # score as the model before extension: old ids only
            unembed = lambda h: model.logits(h)[..., :vocab_limit]  # noqa: E731
        mask = batch["loss_mask"].astype(jnp.float32)
        logp = losses.chunked_token_logprobs(hidden, unembed, batch["tokens"])
        return -(logp * mask).sum(), mask.sum()

    return nll


class DocSet:
    """Whole documents encoded one per row, with their word and byte counts."""

    def __init__(self, texts, tokenizer, seq_len: int, batch_size: int):
        encode = lm.text_encoder(tokenizer, seq_len)
        self.batches = pipeline.make_eval_batches(
            [[{"text": t} for t in texts]], encode, seq_len=seq_len, batch_size=batch_size,
            shard_index=0, shard_count=1,
        )  # fmt: skip
        self.words = sum(len(t.split()) for t in texts)
        self.bytes = sum(len(t.encode("utf-8")) for t in texts)
        self.tokens_per_doc = float(np.mean([len(tokenizer.encode(t)) for t in texts]))

    def evaluate(self, model, prefix: str, vocab_limit: int | None = None) -> dict[str, float]:
        fn, total, count = _nll_fn(vocab_limit), 0.0, 0.0
        for batch in self.batches:
            nll, n = sharding.to_host(fn(model, sharding.put_like(batch, nnx.state(model))))
            total, count = total + float(nll), count + float(n)
        return {
            f"{prefix}_ppl": math.exp(min(total / max(self.words, 1), 50.0)),
            f"{prefix}_bpb": total / math.log(2) / max(self.bytes, 1),
            f"{prefix}_token_ppl": math.exp(min(total / max(count, 1.0), 50.0)),
        }


def _fits(texts, toks, seq_len: int) -> list[str]:
    """Texts that fit one row (bos + text + eos) under every tokenizer in `toks`."""
    return [t for t in texts if all(len(k.encode(t)) + 2 <= seq_len for k in toks)]


# =============================================================================================
# The method
# =============================================================================================


def recipe(config, workdir=None, *, base: lm.Base | None = None) -> Recipe:
    """The domain-adaptation Recipe: continued training of `config.init_from` on a domain
    corpus (general text replayed), optionally with new domain tokens."""
    d = config.domain
    if not config.init_from and base is None:
        raise config_lib.ConfigError(
            "config.init_from is empty: domain adaptation continues a pretrained model; give "
            "'fft:tiny', an fft workdir or a local HF model directory."
        )
    if not 0.0 <= d.replay < 1.0:
        raise config_lib.ConfigError(f"config.domain.replay={d.replay} must be in [0, 1).")
    corpora = _corpora(config)
    base = base or lm.load_base(config)
    tokenizer, model_config, load_weights, subs = (
        base.tokenizer,
        base.model_config,
        base.load_weights,
        {},
    )
    if d.vocab.extend and base.tokenizer is not None:
        tokenizer, model_config, load_weights, subs = _extend_vocab(
            config, workdir, base, corpora["domain_train"]
        )
        print(f"[domain] vocabulary {base.tokenizer.vocab_size} -> {tokenizer.vocab_size} "
              f"(+{len(subs)} domain pieces)", flush=True)  # fmt: skip

    # ---- train data: domain + replay of general text --------------------------------------
    def train_data(ctx):
        encode = lm.text_encoder(tokenizer, config.seq_len, truncation="split")
        return pipeline.make_train_iterator(
            [[{"text": t} for t in corpora["domain_train"]],
             [{"text": t} for t in corpora["general_train"]]],
            encode, seq_len=config.seq_len, batch_size=config.batch_size,
            packing=config.data.packing, shuffle=config.data.shuffle, seed=config.seed,
            weights=[1.0 - d.replay, d.replay], shard_index=ctx.shard.index,
            shard_count=ctx.shard.count,
        )  # fmt: skip

    model = ModelSpec(lm.model_builder(model_config, config), load_weights, model_config)
    extras = {"eval_docs": {}, "base": {}}

    def evaluate(ctx):
        return _make_evaluate(config, ctx, base, tokenizer, corpora, bool(subs), extras)

    def finalize(results: dict) -> dict:
        out = {
            "eval_docs": extras["eval_docs"],
            "general_source": general_source_name(config),  # the general eval text's source
            "ppl_unit": "per word (whole documents; *_bpb per byte, *_token_ppl per token)",
        }
        if subs:
            out["vocab"] = {"old": base.tokenizer.vocab_size, "new": tokenizer.vocab_size}
            if extras["base"]:
                out["base"] = extras["base"]
        return out

    return Recipe(
        method="domain",
        model=model,
        loss_fn=lm.next_token_loss_fn(),
        train_data=train_data,
        batch_spec=lm_batch_spec(config.seq_len),
        evaluate=evaluate,
        trainable=lm.trainable_filter(config),
        tokenizer=tokenizer,
        finalize=finalize,
    )


def _make_evaluate(config, ctx, base, tokenizer, corpora, extended: bool, extras: dict):
    """`evaluate(model)`: domain and general perplexity of whole documents; with new tokens,
    the base's own numbers once (`extras['base']`, kept in eval_base.json across restarts)."""
    d, workdir = config.domain, ctx.workdir
    toks = [base.tokenizer, tokenizer]
    eval_texts = {
        k: _fits(corpora[f"{k}_eval"], toks, d.eval_seq_len) for k in ("domain", "general")
    }
    for k, texts in eval_texts.items():
        if not texts:
            raise config_lib.ConfigError(
                f"no {k} eval document fits domain.eval_seq_len={d.eval_seq_len} tokens; raise it."
            )
    extras["eval_docs"] = {k: len(t) for k, t in eval_texts.items()}
    sets = {
        k: DocSet(t, tokenizer, d.eval_seq_len, config.batch_size) for k, t in eval_texts.items()
    }
    base_sets = None
    if extended:  # the base model with its own tokenizer: the real starting point
        base_sets = {
            k: DocSet(t, base.tokenizer, d.eval_seq_len, config.batch_size)
            for k, t in eval_texts.items()
        }
    # Base metrics are measured once, on a fresh start (a resumed run reads them back).
    base_path = os.path.join(workdir, "eval_base.json")
    base_metrics: dict[str, float] = extras["base"]
    if base_sets is not None and os.path.exists(base_path):
        with open(base_path) as f:
            base_metrics.update(json.load(f))
    elif not ctx.fresh:
        base_sets = None  # resumed past the start without them: nothing exact to measure

    def evaluate(model) -> dict:
        out = {}
        for k, s in sets.items():
            out.update(s.evaluate(model, k))
        out["tokens_per_doc"] = sets["domain"].tokens_per_doc
        if base_sets is not None and not base_metrics:
            # Restricting the extended model's logits to the old ids gives exactly the base
            # model (old rows unchanged), so this needs no second model.
            for k, s in base_sets.items():
                base_metrics.update(s.evaluate(model, k, vocab_limit=base.tokenizer.vocab_size))
            base_metrics["tokens_per_doc"] = base_sets["domain"].tokens_per_doc
            if jax.process_index() == 0:
                os.makedirs(workdir, exist_ok=True)
                with open(base_path, "w") as f:
                    json.dump(base_metrics, f)
        return out

    return evaluate
