"""ModelConfig: one frozen, JSON-able description of a decoder (or encoder) model.

Every model family (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3, GPT-2, BERT) is a
setting of these fields; `family` is informational only, the code branches on the switches.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fft.config_lib import ConfigError

_CHOICES = {
    "norm": ("rms", "layer"),
    "pos": ("rope", "learned", "none"),
    "mlp": ("swiglu", "geglu", "gelu"),
    "act": ("silu", "gelu", "gelu_tanh", "relu"),
    "remat": ("none", "full", "dots", "save_qkv", "offload"),
    "attention": ("auto", "xla", "cudnn", "splash", "flash"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16", "float16"),
    "quant": ("none", "int8", "nf4"),  # fft.models.quant.CODECS
}
_ROPE_TYPES = ("default", "linear", "llama3")
# fft-built vocabularies are padded to a multiple of this many rows (ModelConfig.with_vocab).
VOCAB_MULTIPLE = 128


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a transformer. See docs/architecture.md for what each field means."""

    family: str = "llama"  # informational: the HF model_type (llama, qwen3, gemma3_text, ...)
    vocab_size: int  # rows of the embedding table (and columns of the output layer)
    real_vocab_size: int = 0  # ids below it are tokens, the rest padding rows; 0 = vocab_size
    d_model: int  # width of the residual stream
    n_layers: int  # number of transformer blocks
    n_heads: int  # query heads
    n_kv_heads: int | None = None  # key/value heads (GQA/MQA); None = n_heads
    head_dim: int | None = None  # per-head width; None = d_model // n_heads
    d_ff: int  # hidden width of the MLP
    max_seq_len: int = 2048  # rows of the learned position table (pos='learned')
    norm: str = "rms"  # 'rms' | 'layer'
    norm_eps: float = 1e-6  # epsilon inside the norm
    norm_offset: float = 0.0  # gemma: 1.0, the scale is stored as w and applied as (1 + w)
    norm_bias: bool = True  # layer norm has a bias (ignored for rms)
    pos: str = "rope"  # 'rope' | 'learned' | 'none'
    rope_theta: float = 10000.0  # rotary base
    rope_scaling: dict | None = None  # HF style: {'rope_type': 'linear'|'llama3', 'factor': ...}
    rope_local_theta: float = 0.0  # gemma3: unscaled rotary base of sliding-window layers; 0 = same
    mlp: str = "swiglu"  # 'swiglu' | 'geglu' (gated, activation = act) | 'gelu' (plain, act)
    act: str = "silu"  # activation of the MLP
    qkv_bias: bool = False  # bias on q/k/v projections (qwen2, gpt2)
    o_bias: bool = False  # bias on the attention output projection (gpt2)
    mlp_bias: bool = False  # bias on the MLP projections (gpt2)
    tie_embeddings: bool = False  # unembed with the embedding table
    embed_scale: bool = False  # gemma: multiply embeddings by sqrt(d_model)
    logit_softcap: float = 0.0  # 0 = off; logits = c * tanh(logits / c)
    attn_softcap: float = 0.0  # 0 = off; scores = c * tanh(scores / c)
    query_scale: float | None = None  # None = head_dim ** -0.5
    sliding_window: int = 0  # 0 = none; else a query sees the last `sliding_window` tokens
    sliding_window_pattern: int = 1  # 1 = every layer local; k = every k-th layer global
    post_norms: bool = False  # gemma2/3: extra norms after attention and MLP
    qk_norm: bool = False  # qwen3/gemma3: a norm over head_dim on each q and k head, before rope
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters
    remat: str = "none"  # none | full | dots | save_qkv | offload (transformer._remat_policy)
    scan_layers: bool = False  # stack the blocks' params on a 'layers' axis, lax.scan over them
    attention: str = "auto"  # 'auto' | 'xla' | 'cudnn' | 'splash' | 'flash' (fft.models.attention)
    quant: str = "none"  # frozen block kernels stored as 'int8' | 'nf4' codes (fft.models.quant)
    quant_block: int = 64  # weights per quantization scale along a kernel's last input axis

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.d_model // max(self.n_heads, 1))
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(
                    f"ModelConfig.{key}={getattr(self, key)!r} is not one of {choices}."
                )
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"ModelConfig.{key} must be positive, got {getattr(self, key)}.")
        if not 0 <= self.real_vocab_size <= self.vocab_size:
            raise ConfigError(
                f"ModelConfig.real_vocab_size={self.real_vocab_size} must be in "
                f"[0, vocab_size={self.vocab_size}]."
            )
        if self.real_vocab_size == self.vocab_size:
            # One spelling per model (hash, JSON, equality): 0 means no padding rows.
            object.__setattr__(self, "real_vocab_size", 0)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"ModelConfig.n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}."
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim={self.head_dim} must be even for rope.")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in _ROPE_TYPES:
                raise ConfigError(
                    f"ModelConfig.rope_scaling type {kind!r} is not supported; use one of "
                    f"{_ROPE_TYPES}."
                )
        if self.quant_block < 1:
            raise ConfigError(f"ModelConfig.quant_block={self.quant_block} must be >= 1.")
        if self.rope_local_theta < 0:
            raise ConfigError("ModelConfig.rope_local_theta must be >= 0 (0 = rope_theta).")
        if self.sliding_window_pattern < 1:
            raise ConfigError("ModelConfig.sliding_window_pattern must be >= 1.")

    def __hash__(self):
        # rope_scaling is a dict; hash the JSON form so a config can be static in a jit/graphdef.
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; `from_dict(to_dict())` round-trips."""
        d = dataclasses.asdict(self)
        if not d["real_vocab_size"]:
            # Unpadded models keep the model.json they had before the field existed.
            del d["real_vocab_size"]
        if d["quant"] == "none":  # likewise for full-precision models
            del d["quant"], d["quant_block"]
        for key in ("rope_local_theta", "qk_norm"):  # likewise for the families without them
            if not d[key]:
                del d[key]
        if d["rope_scaling"] is not None:
            d["rope_scaling"] = dict(d["rope_scaling"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Builds a config from a dict; unknown keys raise ConfigError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"Unknown ModelConfig keys {unknown}; known keys: {sorted(names)}.")
        return cls(**d)

    def replace(self, **kw) -> ModelConfig:
        """A copy with some fields changed (unknown fields raise ConfigError)."""
        d = self.to_dict()
        d.update(kw)
        return ModelConfig.from_dict(d)

    @property
    def n_tokens(self) -> int:
        """The real vocabulary: ids `0..n_tokens-1`; rows from `n_tokens` up are padding."""
        return self.real_vocab_size or self.vocab_size

    def with_vocab(self, n_tokens: int, multiple: int = VOCAB_MULTIPLE) -> ModelConfig:
        """A copy for `n_tokens` real ids, its rows padded up to a multiple of `multiple`.

        Why pad: a vocabulary of e.g. 4099 rows divides over no tensor-parallel mesh axis, so
        the embedding and the logits would be replicated on every device (`fft.sharding` warns);
        128 also keeps the unembedding matmul on whole MXU / tensor-core tiles. The padding rows
        are masked out of the logits (`Transformer.logits`) and cut off on export.
        """
        rows = -(-n_tokens // multiple) * multiple
        return self.replace(vocab_size=rows, real_vocab_size=n_tokens)

    def is_local_layer(self, i: int) -> bool:
        """Whether layer `i` uses the sliding window (HF `sliding_window_pattern` convention)."""
        if not self.sliding_window:
            return False
        p = self.sliding_window_pattern
        return p == 1 or (i + 1) % p != 0
