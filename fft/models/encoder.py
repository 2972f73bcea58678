"""Bidirectional encoder family (BERT / MiniLM) in Flax NNX.

BERT layout: word + absolute position + token-type embeddings, a LayerNorm over their sum, then
post-LayerNorm blocks (``x = norm(x + attn(x)); x = norm(x + mlp(x))``), exact (erf) GELU, biases
on every projection and norm. The param tree mirrors the decoder's names where the parts match, so
trainable-regex filters and LoRA targets read the same:

```
embed.embedding              [V, D]    ('vocab','embed')
pos_embed.embedding          [S, D]    (None,'embed')
type_embed.embedding         [Tv, D]   (None,'embed')
embed_norm.scale / .bias     [D]       ('norm',)
layers.<i>.attn.q.kernel     [D,H,Dh]  ('embed','heads','head_dim')  + q.bias [H,Dh]
layers.<i>.attn.k / .v       same as q (BERT has no grouped KV heads)
layers.<i>.attn.o.kernel     [H,Dh,D]  ('heads','head_dim','embed')  + o.bias [D]
layers.<i>.attn_norm         LayerNorm after the attention residual (post-LN)
layers.<i>.mlp.up.kernel     [D,F]     ('embed','mlp')               + bias [F]
layers.<i>.mlp.down.kernel   [F,D]     ('mlp','embed')               + bias [D]
layers.<i>.mlp_norm          LayerNorm after the MLP residual (post-LN)
```

The encoder has its own `EncoderConfig` (not `ModelConfig`): BERT needs `type_vocab_size` and has
no rope / kv-heads / softcap knobs, and `ModelConfig.from_dict` rejects unknown keys. Both configs
carry `family` so a saved `model.json` says which class to build (`family == 'bert'`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fft.config_lib import FFTError
from fft.models import layers
from fft.sharding import constrain as _constrain

_ACTS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT's "gelu" is the exact erf form
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shape and numerics of a BERT-style encoder (all-MiniLM-L6-v2 is the reference)."""

    family: str = "bert"  # informational; 'bert' tells loaders to build an Encoder
    vocab_size: int = 30522  # word-piece vocabulary
    d_model: int = 384  # hidden size
    n_layers: int = 6  # transformer blocks
    n_heads: int = 12  # attention heads
    head_dim: int = 32  # per-head width (d_model // n_heads for BERT)
    d_ff: int = 1536  # MLP width
    max_seq_len: int = 512  # learned absolute positions
    type_vocab_size: int = 2  # token-type (segment A/B) embeddings
    norm_eps: float = 1e-12  # LayerNorm epsilon
    act: str = "gelu"  # gelu (exact erf) | gelu_tanh | relu | silu
    pad_id: int = 0  # padding token id (informational; masks come from attention_mask)
    init_std: float = 0.02  # normal init std (HF initializer_range)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # parameter dtype

    def __post_init__(self):
        if self.act not in _ACTS:
            raise FFTError(f"EncoderConfig.act={self.act!r} unknown; use one of {sorted(_ACTS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FFTError(f"EncoderConfig: unknown keys {unknown}; known keys are {sorted(names)}")
        return cls(**d)

    def replace(self, **kw) -> EncoderConfig:
        return dataclasses.replace(self, **kw)


def _linear(in_shape, out_shape, names, cfg: EncoderConfig, rngs):
    # The decoder's Linear, so LoRA (`fft.models.lora.apply_lora`) attaches to the encoder too.
    return layers.Linear(
        in_shape,
        out_shape,
        names=names,
        use_bias=True,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        init_std=cfg.init_std,
        rngs=rngs,
    )


def _layer_norm(cfg: EncoderConfig):
    return layers.LayerNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))


def _embed(n, names, cfg: EncoderConfig, rngs):
    return layers.Embed(
        n,
        cfg.d_model,
        names=names,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        init_std=cfg.init_std,
        rngs=rngs,
    )


class EncoderAttention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.q = _linear((d,), (h, dh), ("embed", "heads", "head_dim"), cfg, rngs)
        self.k = _linear((d,), (h, dh), ("embed", "heads", "head_dim"), cfg, rngs)
        self.v = _linear((d,), (h, dh), ("embed", "heads", "head_dim"), cfg, rngs)
        self.o = _linear((h, dh), (d,), ("heads", "head_dim", "embed"), cfg, rngs)
        self.scale = dh**-0.5

    def __call__(self, x_btd, allowed_bts):
        q_btnh = _constrain(self.q(x_btd), ("batch", "length", "act_heads", None))
        k_bsnh = _constrain(self.k(x_btd), ("batch", "length", "act_heads", None))
        v_bsnh = _constrain(self.v(x_btd), ("batch", "length", "act_heads", None))
        s_bnts = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_bsnh).astype(jnp.float32) * self.scale
        # A finite minimum (as HF does) keeps an all-padding row uniform instead of NaN.
        s_bnts = jnp.where(allowed_bts[:, None], s_bnts, jnp.finfo(jnp.float32).min)
        p_bnts = jax.nn.softmax(s_bnts, axis=-1).astype(v_bsnh.dtype)
        o_btnh = jnp.einsum("bnts,bsnh->btnh", p_bnts, v_bsnh)
        return self.o(o_btnh)


class EncoderMLP(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.up = _linear((cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"), cfg, rngs)
        self.down = _linear((cfg.d_ff,), (cfg.d_model,), ("mlp", "embed"), cfg, rngs)
        self.act = _ACTS[cfg.act]

    def __call__(self, x_btd):
        h_btf = _constrain(self.act(self.up(x_btd)), ("batch", "length", "act_mlp"))
        return self.down(h_btf)


class EncoderBlock(nnx.Module):
    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.attn = EncoderAttention(cfg, rngs)
        self.attn_norm = _layer_norm(cfg)
        self.mlp = EncoderMLP(cfg, rngs)
        self.mlp_norm = _layer_norm(cfg)

    def __call__(self, x_btd, allowed_bts):
        x_btd = self.attn_norm(x_btd + self.attn(x_btd, allowed_bts))  # post-LN, as in BERT
        return self.mlp_norm(x_btd + self.mlp(x_btd))


def attention_allowed(segment_ids_bt: jax.Array) -> jax.Array:
    """Bidirectional mask [B,T,S] from a 0/1 attention mask or packed segment ids (0 = pad).

    A query attends to every non-pad key of its own segment. Pad queries attend to all non-pad
    keys, which is what HF BERT does with a key-only mask, so pad rows match it too.
    """
    seg_q, seg_k = segment_ids_bt[:, :, None], segment_ids_bt[:, None, :]
    return (seg_k != 0) & ((seg_q == seg_k) | (seg_q == 0))


class Encoder(nnx.Module):
    """BERT-style bidirectional encoder returning the last hidden states [B,T,D]."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _embed(cfg.vocab_size, ("vocab", "embed"), cfg, rngs)
        self.pos_embed = _embed(cfg.max_seq_len, (None, "embed"), cfg, rngs)
        self.type_embed = _embed(cfg.type_vocab_size, (None, "embed"), cfg, rngs)
        self.embed_norm = _layer_norm(cfg)
        self.layers = nnx.List([EncoderBlock(cfg, rngs) for _ in range(cfg.n_layers)])

    def __call__(self, tokens, token_types=None, attention_mask=None, positions=None):
        """Encode a batch.

        Args:
          tokens: int [B,T] token ids.
          token_types: int [B,T] segment A/B ids for the type embedding (default 0).
          attention_mask: [B,T] 1/True for real tokens, 0 for pads; packed segment ids also work
            (tokens then attend only within their segment). Default: all real.
          positions: int [B,T] absolute positions (default arange(T), as BERT uses).

        Returns:
          hidden states [B,T,D] in the compute dtype (after the last block's LayerNorm).
        """
        b, t = tokens.shape
        if t > self.cfg.max_seq_len:
            raise FFTError(f"sequence length {t} exceeds max_seq_len={self.cfg.max_seq_len}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if token_types is None:
            token_types = jnp.zeros((b, t), jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        seg_bt = attention_mask.astype(jnp.int32)
        x_btd = self.embed(tokens) + self.pos_embed(positions) + self.type_embed(token_types)
        x_btd = self.embed_norm(x_btd.astype(jnp.dtype(self.cfg.dtype)))
        x_btd = _constrain(x_btd, ("batch", "length", "act_embed"))
        allowed_bts = attention_allowed(seg_bt)
        for layer in self.layers:
            x_btd = _constrain(layer(x_btd, allowed_bts), ("batch", "length", "act_embed"))
        return x_btd

    def hidden_states(self, tokens, positions=None, segment_ids=None, token_types=None):
        """Decoder-compatible alias: heads call `backbone.hidden_states(tokens, positions, seg)`."""
        return self(
            tokens, token_types=token_types, attention_mask=segment_ids, positions=positions
        )


def mean_pool(hidden_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Mean of the hidden states over real tokens (sentence-transformers' pooling).

    Args:
      hidden_btd: [B,T,D] hidden states.
      mask_bt: [B,T] attention mask or segment ids (nonzero = real token).

    Returns:
      [B,D] float32 means; an all-pad row gives zeros.
    """
    m_bt1 = (mask_bt != 0).astype(jnp.float32)[..., None]
    total_bd = (hidden_btd.astype(jnp.float32) * m_bt1).sum(axis=1)
    return total_bd / jnp.maximum(m_bt1.sum(axis=1), 1e-9)
