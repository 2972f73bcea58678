"""The tensor tables between HuggingFace checkpoints and fft param trees, one per family.

Each `Entry` names one HF tensor (without the head-class prefix such as `model.`), the fft
leaves it fills, and the reshapes both ways. HF linears store `[out, in]`; fft's einsum kernels
store `[in..., out...]` (q: `[D,H,Dh]`, o: `[H,Dh,D]`), so a weight is a transpose + reshape.
GPT-2's Conv1D already stores `[in, out]` and fuses q/k/v into one `c_attn` tensor, split here.
fft's rotary uses HF's rotate-half convention, so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from fft.models.config import ModelConfig
from fft.models.encoder import EncoderConfig

Path = tuple  # an fft param path, e.g. ('layers', 0, 'attn', 'q', 'kernel')


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor <-> the fft leaves it holds."""

    hf: str  # canonical HF name (no 'model.'/'transformer.'/'bert.' prefix)
    paths: tuple[Path, ...]  # fft leaves, in the order `to_fft` returns them
    to_fft: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]  # fft arrays (same order) -> HF tensor
    linear: bool = False  # a plain HF Linear/Conv1D weight <-> one fft kernel (LoRA-able)


def _linear(hf, path, in_shape, out_shape, conv1d=False):
    """An HF Linear `[out, in]` (or GPT-2 Conv1D `[in, out]`) <-> a kernel `[*in, *out]`."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    shape = (*in_shape, *out_shape)
    if conv1d:
        return Entry(
            hf, (path,), lambda w: (w.reshape(shape),), lambda k: k.reshape(n_in, n_out), True
        )
    return Entry(
        hf, (path,), lambda w: (w.T.reshape(shape),), lambda k: k.reshape(n_in, n_out).T, True
    )


def _reshaped(hf, path, shape):
    """A tensor whose fft form is a reshape (biases: HF `[H*Dh]` <-> fft `[H, Dh]`)."""
    return Entry(hf, (path,), lambda w: (w.reshape(shape),), lambda b: b.reshape(-1))


def _copy(hf, path):
    return Entry(hf, (path,), lambda w: (w,), lambda x: x)


def _fused_qkv(hf, paths, split, shapes, axis):
    """GPT-2's `c_attn` (q|k|v concatenated along `axis`) <-> three fft leaves."""

    def to_fft(w):
        parts = np.split(w, np.cumsum(split)[:-1], axis=axis)
        return tuple(p.reshape(s) for p, s in zip(parts, shapes, strict=True))

    def to_hf(*xs):
        lead = () if axis == 0 else (xs[0].shape[0],)
        return np.concatenate([x.reshape(*lead, -1) for x in xs], axis=axis)

    return Entry(hf, tuple(paths), to_fft, to_hf)


def _norm(hf_prefix, path, bias):
    out = [_copy(f"{hf_prefix}.weight", (*path, "scale"))]
    if bias:
        out.append(_copy(f"{hf_prefix}.bias", (*path, "bias")))
    return out


def _decoder_layout(cfg: ModelConfig) -> list[Entry]:
    d, h, k, dh, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    layer_norm = cfg.norm == "layer" and cfg.norm_bias
    if cfg.family == "gpt2":
        return _gpt2_layout(cfg)
    out = [_copy("embed_tokens.weight", ("embed", "embedding"))]
    for i in range(cfg.n_layers):
        hp, fp = f"layers.{i}", ("layers", i)
        a, m = f"{hp}.self_attn", f"{hp}.mlp"
        out += _norm(f"{hp}.input_layernorm", (*fp, "attn_norm"), layer_norm)
        for name, heads in (("q", h), ("k", k), ("v", k)):
            out.append(
                _linear(f"{a}.{name}_proj.weight", (*fp, "attn", name, "kernel"), (d,), (heads, dh))
            )
            if cfg.qkv_bias:
                out.append(
                    _reshaped(f"{a}.{name}_proj.bias", (*fp, "attn", name, "bias"), (heads, dh))
                )
        out.append(_linear(f"{a}.o_proj.weight", (*fp, "attn", "o", "kernel"), (h, dh), (d,)))
        if cfg.qk_norm:  # qwen3/gemma3: per-head norms on q and k, [head_dim] each
            out += _norm(f"{a}.q_norm", (*fp, "attn", "q_norm"), layer_norm)
            out += _norm(f"{a}.k_norm", (*fp, "attn", "k_norm"), layer_norm)
        if cfg.o_bias:
            out.append(_copy(f"{a}.o_proj.bias", (*fp, "attn", "o", "bias")))
        if cfg.post_norms:  # gemma2/3: norms after attention and MLP as well as before
            out += _norm(f"{hp}.post_attention_layernorm", (*fp, "post_attn_norm"), layer_norm)
            out += _norm(f"{hp}.pre_feedforward_layernorm", (*fp, "mlp_norm"), layer_norm)
            out += _norm(f"{hp}.post_feedforward_layernorm", (*fp, "post_mlp_norm"), layer_norm)
        else:
            out += _norm(f"{hp}.post_attention_layernorm", (*fp, "mlp_norm"), layer_norm)
        names = ("gate", "up", "down") if cfg.mlp in ("swiglu", "geglu") else ("up", "down")
        for name in names:
            shape_in, shape_out = ((f,), (d,)) if name == "down" else ((d,), (f,))
            out.append(
                _linear(
                    f"{m}.{name}_proj.weight", (*fp, "mlp", name, "kernel"), shape_in, shape_out
                )
            )
            if cfg.mlp_bias:
                out.append(_copy(f"{m}.{name}_proj.bias", (*fp, "mlp", name, "bias")))
    out += _norm("norm", ("final_norm",), layer_norm)
    if not cfg.tie_embeddings:
        out.append(_linear("lm_head.weight", ("lm_head", "kernel"), (d,), (cfg.vocab_size,)))
    return out


def _gpt2_layout(cfg: ModelConfig) -> list[Entry]:
    d, h, dh, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    out = [
        _copy("wte.weight", ("embed", "embedding")),
        _copy("wpe.weight", ("pos_embed", "embedding")),
    ]
    for i in range(cfg.n_layers):
        hp, fp = f"h.{i}", ("layers", i)
        att = (*fp, "attn")
        out += _norm(f"{hp}.ln_1", (*fp, "attn_norm"), True)
        qkv = [(*att, n, "kernel") for n in "qkv"]
        out.append(_fused_qkv(f"{hp}.attn.c_attn.weight", qkv, [d] * 3, [(d, h, dh)] * 3, axis=1))
        qkv_b = [(*att, n, "bias") for n in "qkv"]
        out.append(_fused_qkv(f"{hp}.attn.c_attn.bias", qkv_b, [d] * 3, [(h, dh)] * 3, axis=0))
        out.append(_linear(f"{hp}.attn.c_proj.weight", (*att, "o", "kernel"), (h, dh), (d,), True))
        out.append(_copy(f"{hp}.attn.c_proj.bias", (*att, "o", "bias")))
        out += _norm(f"{hp}.ln_2", (*fp, "mlp_norm"), True)
        out.append(_linear(f"{hp}.mlp.c_fc.weight", (*fp, "mlp", "up", "kernel"), (d,), (f,), True))
        out.append(_copy(f"{hp}.mlp.c_fc.bias", (*fp, "mlp", "up", "bias")))
        out.append(
            _linear(f"{hp}.mlp.c_proj.weight", (*fp, "mlp", "down", "kernel"), (f,), (d,), True)
        )
        out.append(_copy(f"{hp}.mlp.c_proj.bias", (*fp, "mlp", "down", "bias")))
    out += _norm("ln_f", ("final_norm",), True)
    if not cfg.tie_embeddings:
        out.append(_linear("lm_head.weight", ("lm_head", "kernel"), (d,), (cfg.vocab_size,)))
    return out


def _bert_layout(cfg: EncoderConfig) -> list[Entry]:
    d, h, dh, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    out = [
        _copy("embeddings.word_embeddings.weight", ("embed", "embedding")),
        _copy("embeddings.position_embeddings.weight", ("pos_embed", "embedding")),
        _copy("embeddings.token_type_embeddings.weight", ("type_embed", "embedding")),
        *_norm("embeddings.LayerNorm", ("embed_norm",), True),
    ]
    for i in range(cfg.n_layers):
        hp, fp = f"encoder.layer.{i}", ("layers", i)
        for hf_name, name in (("query", "q"), ("key", "k"), ("value", "v")):
            w = f"{hp}.attention.self.{hf_name}"
            out.append(_linear(f"{w}.weight", (*fp, "attn", name, "kernel"), (d,), (h, dh)))
            out.append(_reshaped(f"{w}.bias", (*fp, "attn", name, "bias"), (h, dh)))
        o = f"{hp}.attention.output"
        out.append(_linear(f"{o}.dense.weight", (*fp, "attn", "o", "kernel"), (h, dh), (d,)))
        out.append(_copy(f"{o}.dense.bias", (*fp, "attn", "o", "bias")))
        out += _norm(f"{o}.LayerNorm", (*fp, "attn_norm"), True)
        out.append(
            _linear(f"{hp}.intermediate.dense.weight", (*fp, "mlp", "up", "kernel"), (d,), (f,))
        )
        out.append(_copy(f"{hp}.intermediate.dense.bias", (*fp, "mlp", "up", "bias")))
        out.append(_linear(f"{hp}.output.dense.weight", (*fp, "mlp", "down", "kernel"), (f,), (d,)))
        out.append(_copy(f"{hp}.output.dense.bias", (*fp, "mlp", "down", "bias")))
        out += _norm(f"{hp}.output.LayerNorm", (*fp, "mlp_norm"), True)
    return out


def layout(cfg) -> list[Entry]:
    """The table for `cfg` (EncoderConfig -> BERT; else by `cfg.family`, gpt2 or llama-like)."""
    return _bert_layout(cfg) if isinstance(cfg, EncoderConfig) else _decoder_layout(cfg)


# HF checkpoints prefix the backbone differently by head class (LlamaForCausalLM: 'model.',
# GPT2LMHeadModel: 'transformer.', BertForMaskedLM: 'bert.'); export writes the first one.
_PREFIXES = {"gpt2": ("transformer.", ""), "bert": ("", "bert.")}


def prefixes(cfg) -> tuple[str, ...]:
    """Backbone prefixes a checkpoint of `cfg`'s family may use; the first is written on export."""
    return _PREFIXES.get(cfg.family, ("model.", ""))


def hf_name(cfg, canonical: str) -> str:
    """The stored name of a canonical tensor name in a checkpoint fft writes."""
    return canonical if canonical == "lm_head.weight" else prefixes(cfg)[0] + canonical
