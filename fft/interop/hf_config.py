"""HuggingFace `config.json` <-> fft ModelConfig / EncoderConfig.

Both rope spellings are read: transformers >= 5 writes `rope_parameters` (theta + scaling in one
dict), older versions `rope_theta` + `rope_scaling`. Export writes `rope_parameters` plus the old
`rope_theta` so either generation of transformers loads it. Gemma 3's `rope_parameters` is
keyed by layer type (`full_attention`, `sliding_attention`); older files say `rope_theta` and
`rope_local_base_freq`.
"""

from __future__ import annotations

from typing import Any

from fft.config_lib import FFTError
from fft.models.config import ModelConfig
from fft.models.encoder import EncoderConfig

SUPPORTED = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2", "bert",
)  # fmt: skip

_ACTS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}


def _act(hf: dict, *keys: str) -> str:
    for key in keys:
        if hf.get(key):
            name = hf[key]
            if name not in _ACTS:
                raise FFTError(f"HF activation {key}={name!r} is not supported by fft")
            return _ACTS[name]
    return "silu"


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either rope spelling; scaling None for the default rope.

    For a Gemma 3 config, those of its global (`full_attention`) layers.
    """
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params:
        params = dict(params["full_attention"] or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params or dict(hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise FFTError(f"HF rope scaling type {kind!r} is not supported (fft has linear, llama3)")
    scaling.pop("type", None)
    scaling.pop("partial_rotary_factor", None)
    return theta, {"rope_type": kind, **{k: v for k, v in scaling.items() if k != "rope_type"}}


def _decoder_common(hf: dict) -> dict[str, Any]:
    theta, scaling = _rope(hf)
    n_heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def config_from_hf(hf: dict) -> ModelConfig | EncoderConfig:
    """Maps a HF `config.json` dict to an fft config.

    Raises:
      FFTError naming the `model_type` (or option) fft cannot represent.
    """
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise FFTError(f"HF model_type {mt!r} is not supported; fft loads {', '.join(SUPPORTED)}")
    if mt == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise FFTError("HF bert position_embedding_type must be 'absolute' for fft")
        return EncoderConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            head_dim=hf["hidden_size"] // hf["num_attention_heads"],
            d_ff=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            act=_act(hf, "hidden_act"),
            pad_id=hf.get("pad_token_id") or 0,
        )
    if mt == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise FFTError(
                "HF gpt2 scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn unsupported"
            )
        if hf.get("scale_attn_weights") is False:
            raise FFTError("HF gpt2 scale_attn_weights=False is not supported")
        d = hf["n_embd"]
        return ModelConfig(
            family="gpt2", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"],
            n_heads=hf["n_head"], n_kv_heads=hf["n_head"], head_dim=d // hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf.get("n_positions", 1024),
            norm="layer", norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos="learned",
            mlp="gelu", act=_act(hf, "activation_function"), qkv_bias=True, o_bias=True,
            mlp_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )  # fmt: skip
    kw = _decoder_common(hf)
    if mt in ("llama", "mistral"):
        bias = bool(hf.get("attention_bias", False))
        kw.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
        kw.update(act=_act(hf, "hidden_act"))
        if mt == "mistral" and hf.get("sliding_window"):
            kw.update(sliding_window=int(hf["sliding_window"]))
    elif mt == "qwen2":
        if hf.get("use_sliding_window"):
            raise FFTError("HF qwen2 use_sliding_window=True is not supported by fft")
        kw.update(qkv_bias=True, act=_act(hf, "hidden_act"))
    elif mt == "qwen3":
        if hf.get("use_sliding_window"):
            raise FFTError("HF qwen3 use_sliding_window=True is not supported by fft")
        bias = bool(hf.get("attention_bias", False))
        kw.update(qkv_bias=bias, o_bias=bias, qk_norm=True, act=_act(hf, "hidden_act"))
    else:  # gemma, gemma2, gemma3_text
        kw.update(
            norm_offset=1.0, embed_scale=True, mlp="geglu",
            act=_act(hf, "hidden_activation", "hidden_act"),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )  # fmt: skip
        if hf.get("attention_bias"):
            kw.update(qkv_bias=True, o_bias=True)
        if mt == "gemma2":
            kw.update(_gemma2(hf))
        if mt == "gemma3_text":
            kw.update(_gemma3(hf))
    return ModelConfig(family=mt, **kw)


def _gemma3(hf: dict) -> dict[str, Any]:
    """Gemma 3 text: gemma2's four norms and query scale, QK-norm, a local/global layer pattern
    (every `p`-th layer global; HF's `layer_types`, or the older `sliding_window_pattern`) and a
    separate rotary base for the local layers."""
    if hf.get("use_bidirectional_attention"):
        raise FFTError("HF gemma3 use_bidirectional_attention=True is not supported by fft")
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        p = int(hf.get("sliding_window_pattern") or 6)
    else:
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        p = full[0] + 1 if full else 1
        if full and p == 1:  # every layer global: no window
            p = 0
        want = [
            "sliding_attention" if p == 1 or (p and (i + 1) % p) else "full_attention"
            for i in range(n)
        ]
        if list(types) != want:
            raise FFTError(
                "HF gemma3 layer_types other than 'every p-th layer full_attention' are "
                f"unsupported: {list(types)}"
            )
    params = hf.get("rope_parameters") or {}
    local = dict(params.get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default":
        raise FFTError(f"HF gemma3 sliding-layer rope {local} is not supported (default only)")
    local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))
    window = int(hf.get("sliding_window") or 0) if p else 0
    theta, scaling = _rope(hf)
    if local_theta == theta and scaling is None:
        local_theta = 0.0  # one spelling: 0 = the local layers rotate as the global ones
    return dict(
        post_norms=True,
        qk_norm=True,
        logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        query_scale=float(hf.get("query_pre_attn_scalar", hf.get("head_dim", 256))) ** -0.5,
        sliding_window=window,
        sliding_window_pattern=max(p, 1) if window else 1,
        rope_local_theta=local_theta if window else 0.0,
    )


def _gemma2(hf: dict) -> dict[str, Any]:
    types = hf.get("layer_types")
    n = hf["num_hidden_layers"]
    if types is not None and list(types) != [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)
    ]:
        raise FFTError("HF gemma2 layer_types other than sliding/full alternation are unsupported")
    return dict(
        post_norms=True,
        logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        query_scale=float(hf.get("query_pre_attn_scalar", hf.get("head_dim", 256))) ** -0.5,
        sliding_window=int(hf.get("sliding_window") or 0),
        sliding_window_pattern=2,
    )


def config_to_hf(cfg: ModelConfig | EncoderConfig) -> dict[str, Any]:
    """The HF `config.json` dict for an fft config (inverse of `config_from_hf`).

    Raises:
      FFTError when the fft config uses a switch the HF class of its family cannot express.
    """
    fam = cfg.family
    if fam not in SUPPORTED:
        raise FFTError(f"cannot export family {fam!r} to HF; supported: {', '.join(SUPPORTED)}")
    base = {"model_type": fam, "architectures": [_ARCH[fam]], "vocab_size": cfg.vocab_size}
    if isinstance(cfg, EncoderConfig):
        inv = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
        return base | dict(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
            max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.norm_eps, hidden_act=inv[cfg.act], pad_token_id=cfg.pad_id,
            position_embedding_type="absolute",
        )  # fmt: skip
    _check_expressible(cfg)
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
    if fam == "gpt2":
        return base | dict(
            n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
            n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
            activation_function={"gelu_tanh": "gelu_new"}.get(cfg.act, cfg.act),
            tie_word_embeddings=cfg.tie_embeddings,
        )  # fmt: skip
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    out = base | dict(
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        hidden_act=act[cfg.act], rope_theta=cfg.rope_theta, rope_parameters=rope,
        tie_word_embeddings=cfg.tie_embeddings,
    )  # fmt: skip
    if fam in ("llama", "mistral", "gemma", "gemma2", "gemma3_text", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if fam == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if fam == "mistral":
        out["sliding_window"] = cfg.sliding_window or None
    if fam == "qwen3":
        out["use_sliding_window"] = False
    if fam in ("gemma", "gemma2", "gemma3_text"):
        out["hidden_activation"] = act[cfg.act]
    if fam == "gemma3_text":
        window = cfg.sliding_window
        pattern = cfg.sliding_window_pattern if window else 0
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        out |= dict(
            final_logit_softcapping=cfg.logit_softcap or None,
            attn_logit_softcapping=cfg.attn_softcap or None,
            query_pre_attn_scalar=_int_if_whole((cfg.query_scale or cfg.head_dim**-0.5) ** -2),
            # HF needs a window even when no layer is local; 4096 is its default.
            sliding_window=window or 4096,
            layer_types=[
                "sliding_attention" if cfg.is_local_layer(i) else "full_attention"
                for i in range(cfg.n_layers)
            ],
            rope_parameters={
                "full_attention": rope,
                "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
            },
            rope_local_base_freq=local_theta,
            sliding_window_pattern=pattern or cfg.n_layers + 1,
        )
    if fam == "gemma2":
        out |= dict(
            final_logit_softcapping=cfg.logit_softcap or None,
            attn_logit_softcapping=cfg.attn_softcap or None,
            query_pre_attn_scalar=_int_if_whole((cfg.query_scale or cfg.head_dim**-0.5) ** -2),
            sliding_window=cfg.sliding_window or None,
        )
    return out


def _int_if_whole(x: float):
    # transformers' strict config validation wants an int here; 1/scale**2 is float-rounded.
    return int(round(x)) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else x


# What each HF class hard-codes; an fft config that differs cannot be exported as that class.
_FIXED = {
    "llama": dict(norm="rms", norm_offset=0.0, pos="rope", mlp="swiglu", embed_scale=False,
                  logit_softcap=0.0, attn_softcap=0.0, sliding_window=0, post_norms=False),
    "mistral": dict(norm="rms", norm_offset=0.0, pos="rope", mlp="swiglu", embed_scale=False,
                    logit_softcap=0.0, attn_softcap=0.0, post_norms=False, qkv_bias=False,
                    o_bias=False, mlp_bias=False),
    "qwen2": dict(norm="rms", norm_offset=0.0, pos="rope", mlp="swiglu", embed_scale=False,
                  logit_softcap=0.0, attn_softcap=0.0, sliding_window=0, post_norms=False,
                  qkv_bias=True, o_bias=False, mlp_bias=False),
    "gemma": dict(norm="rms", norm_offset=1.0, pos="rope", mlp="geglu", embed_scale=True,
                  logit_softcap=0.0, attn_softcap=0.0, sliding_window=0, post_norms=False,
                  mlp_bias=False),
    "gemma2": dict(norm="rms", norm_offset=1.0, pos="rope", mlp="geglu", embed_scale=True,
                   post_norms=True, mlp_bias=False),
    "gemma3_text": dict(norm="rms", norm_offset=1.0, pos="rope", mlp="geglu", embed_scale=True,
                        post_norms=True, mlp_bias=False, qk_norm=True),
    "qwen3": dict(norm="rms", norm_offset=0.0, pos="rope", mlp="swiglu", embed_scale=False,
                  logit_softcap=0.0, attn_softcap=0.0, sliding_window=0, post_norms=False,
                  mlp_bias=False, qk_norm=True),
    "gpt2": dict(norm="layer", pos="learned", mlp="gelu", qkv_bias=True, o_bias=True,
                 mlp_bias=True, embed_scale=False, logit_softcap=0.0, attn_softcap=0.0,
                 sliding_window=0, post_norms=False, norm_bias=True),
}  # fmt: skip


# Families whose HF class has one `attention_bias` switch for q/k/v and o alike.
_TIED_BIAS = ("llama", "mistral", "gemma", "gemma2", "gemma3_text", "qwen3")
# New switches the older HF classes hard-code off (qwen3/gemma3 list theirs in _FIXED).
_OFF = dict(qk_norm=False, rope_local_theta=0.0)
_FREE = {"gemma3_text": ("rope_local_theta",)}  # ... except where the family's class has it


def _check_expressible(cfg: ModelConfig) -> None:
    off = {k: v for k, v in _OFF.items() if k not in _FREE.get(cfg.family, ())}
    fixed = off | _FIXED[cfg.family]
    bad = {k: getattr(cfg, k) for k, v in fixed.items() if getattr(cfg, k) != v}
    if cfg.family not in ("gemma2", "gemma3_text", "gpt2") and cfg.query_scale not in (
        None,
        cfg.head_dim**-0.5,
    ):
        bad["query_scale"] = cfg.query_scale
    if cfg.family in _TIED_BIAS and cfg.qkv_bias != cfg.o_bias:
        bad["o_bias"] = cfg.o_bias
    if cfg.family == "gpt2" and cfg.n_kv_heads != cfg.n_heads:
        bad["n_kv_heads"] = cfg.n_kv_heads
    if cfg.family == "gemma2" and cfg.sliding_window and cfg.sliding_window_pattern != 2:
        bad["sliding_window_pattern"] = cfg.sliding_window_pattern
    if (
        cfg.family == "gemma3_text"
        and cfg.sliding_window
        and cfg.rope_scaling
        and not cfg.rope_local_theta
    ):  # fft's local layers would rotate scaled; HF's sliding layers always use plain rope
        bad["rope_local_theta"] = cfg.rope_local_theta
    if cfg.family == "mistral" and cfg.sliding_window and cfg.sliding_window_pattern != 1:
        bad["sliding_window_pattern"] = cfg.sliding_window_pattern
    if bad:
        raise FFTError(
            f"ModelConfig(family={cfg.family!r}) has {bad}, which HF's {_ARCH[cfg.family]} cannot "
            "express; set `family` to the HF class whose architecture matches, or export as fft."
        )
