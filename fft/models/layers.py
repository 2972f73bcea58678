"""Building blocks of the transformers: Linear, norms, rotary, attention (+ KV cache), MLP, Embed.

Every parameter names its logical axes (`out_sharding`); every activation passes through
`fft.sharding.constrain`, a no-op unless a mesh is active. Params are stored in `param_dtype`
and cast to the compute `dtype` at use; norms, softmax and logits are computed in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from fft import sharding
from fft.config_lib import ConfigError
from fft.kernels import cpu as cpu_kernels
from fft.models import attention
from fft.models import quant as quant_lib
from fft.models.config import ModelConfig

# An additive mask value (see fft.models.attention): finite, so a fully masked row gives a
# uniform softmax instead of NaN.
NEG_INF = attention.NEG_INF

BTD = ("batch", "length", "act_embed")


def dtype_of(name: str):
    return jnp.dtype(name)


def activation(name: str):
    """The MLP activation function of a config name."""
    return {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }[name]


# ---------------------------------------------------------------------------------------------
# Linear (with optional LoRA) and Embed
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x: jax.Array, w: jax.Array, n_in: int, out_dtype=None) -> jax.Array:
    """`tensordot(x, w, n_in)` whose weight gradient is one dot with no transposed activations.

    JAX's own transpose rule forms the weight gradient as `transpose(dot(dy, x))`; XLA:CPU
    canonicalises that dot by copying `dy` into a transposed layout first, a strided copy that
    cost ~40 ms per MLP projection per step on the 20m model (more than the matmul it feeds).
    Contracting `x` and `dy` over their leading (token) axes directly, `dot(x, dy) -> [in, out]`,
    lets the matmul read both operands as they are: +21-25% train tokens/s on the 20m model
    (same loss, `python -m fft.bench train`). Forward and values are exactly `tensordot`.

    `out_dtype` (e.g. float32 for the logits of a bf16 model) is the dot's accumulation and
    output type: bf16 operands at bf16 speed, the result not rounded to bf16.
    """
    return jnp.tensordot(x, w, axes=n_in, preferred_element_type=out_dtype)


def _dense_fwd(x, w, n_in, out_dtype):
    return jnp.tensordot(x, w, axes=n_in, preferred_element_type=out_dtype), (x, w)


def _dense_bwd(n_in, out_dtype, res, dy):
    x, w = res
    dy = dy.astype(x.dtype)
    n_batch, n_out = x.ndim - n_in, w.ndim - n_in
    out_dy = tuple(range(n_batch, n_batch + n_out))
    out_w = tuple(range(n_in, n_in + n_out))
    dx = jax.lax.dot_general(dy, w, ((out_dy, out_w), ((), ())))
    lead = tuple(range(n_batch))
    dw = jax.lax.dot_general(x, dy, ((lead, lead), ((), ())))
    return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def _matmul(x: jax.Array, w: jax.Array, n_in: int, dtype, key=None, out_dtype=None) -> jax.Array:
    """`dense(x, w)`, or the CPU decode kernel when `cpu_kernels.decode_weights` packed `w`
    (registered under `key`, the array the model holds, when `w` is derived from it)."""
    packed = cpu_kernels.packed_for(w if key is None else key, math.prod(x.shape[: x.ndim - n_in]))
    if packed is not None and dtype == jnp.float32:
        return cpu_kernels.matmul(x, packed, n_in, w.shape[n_in:])
    return dense(x, w.astype(dtype), n_in, out_dtype)


def packable_weights(model: nnx.Module):
    """`(w, w as [in, out])` for every Linear kernel and Embed table (`attend`) of `model`: what
    `cpu_kernels.decode_weights` may pack for a decode loop."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, Linear) and not m.quant:  # quantized kernels keep XLA's dequant + dot
            w = m.kernel[...]
            yield w, w.reshape(math.prod(m.in_shape), -1)
        elif isinstance(m, Embed):
            w = m.embedding[...]
            yield w, w.T


class Linear(nnx.Module):
    """y[..., out...] = x[..., in...] . kernel[in..., out...] (+ bias[out...]).

    When `fft.models.lora.apply_lora` has attached `lora_a [in..., r]` and `lora_b [r, out...]`
    (LoRAParam), adds `(x . a) . b * lora_scale` unless `lora_enabled` is False.

    With `quant` ('int8' | 'nf4', fft.models.quant) the kernel is stored as `kernel_q` +
    `kernel_scale` (frozen QuantWeight Variables) and dequantized to the compute dtype at each
    matmul; the layer has no `kernel` then.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        names: Sequence[str | None],
        use_bias: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        init_std: float | None = None,
        quant: str = "none",
        quant_block: int = 64,
        rngs: nnx.Rngs,
    ):
        self.in_shape = tuple(int(d) for d in in_shape)
        self.out_shape = tuple(int(d) for d in out_shape)
        self.names = tuple(names)
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)  # a quantized kernel's dtype when merged
        std = math.prod(self.in_shape) ** -0.5 if init_std is None else init_std
        shape = self.in_shape + self.out_shape
        w = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32) * std
        self.quant = "" if quant == "none" else quant
        if self.quant:
            # A random base is quantized like a loaded one, so shapes and dtypes (and so the
            # abstract state, shardings and checkpoints) are the same either way.
            self.kernel_q, self.kernel_scale = quant_lib.quantized_vars(
                w.astype(param_dtype), quant, len(self.out_shape), quant_block, self.names
            )
        else:
            self.kernel = nnx.Param(w.astype(param_dtype), out_sharding=self.names)
        if use_bias:
            b = jnp.zeros(self.out_shape, param_dtype)
            self.bias = nnx.Param(b, out_sharding=self.names[len(self.in_shape) :])
        else:
            self.bias = None
        self.lora_scale = 0.0
        self.lora_enabled = True

    def has_lora(self) -> bool:
        return hasattr(self, "lora_a") and self.lora_enabled

    def weight_var(self) -> nnx.Variable:
        """The Variable holding the kernel's storage: `kernel`, or `kernel_q` when quantized
        (same rank and logical names, so LoRA reads stacked axes and shardings from it)."""
        return self.kernel_q if self.quant else self.kernel

    def weight(self, dtype=None) -> jax.Array:
        """The kernel `[in..., out...]` in `dtype` (default: its own), dequantized if needed."""
        if self.quant:
            return quant_lib.dequantize(
                self.kernel_q[...], self.kernel_scale[...], dtype or jnp.float32
            )
        w = self.kernel[...]
        return w if dtype is None else w.astype(dtype)

    def __call__(self, x, out_dtype=None):
        """`x . kernel` (+ bias, + LoRA) in the compute dtype, or accumulated into and returned
        in `out_dtype` for the base matmul (the LM head's float32 logits)."""
        n_in = len(self.in_shape)
        x = x.astype(self.dtype)
        if self.quant:
            # Dequantized per matmul, straight into the compute dtype: only the codes stay
            # resident; XLA fuses the decode into the dot's operand or frees it right after.
            y = dense(x, self.weight(self.dtype), n_in, out_dtype)
        else:
            y = _matmul(x, self.kernel[...], n_in, self.dtype, out_dtype=out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.has_lora():
            if hasattr(self, "lora_dropout"):
                x = self.lora_dropout(x)
            xa = jnp.tensordot(x, self.lora_a[...].astype(self.dtype), axes=n_in)
            y = y + jnp.tensordot(xa, self.lora_b[...].astype(self.dtype), axes=1) * jnp.asarray(
                self.lora_scale, self.dtype
            )
        return y


class Embed(nnx.Module):
    """A lookup table `embedding [num, dim]`; `attend` multiplies by its transpose (tied head)."""

    def __init__(
        self,
        num: int,
        dim: int,
        *,
        names=("vocab", "embed"),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.dtype = jnp.dtype(dtype)
        w = jax.random.normal(rngs.params(), (num, dim), jnp.float32) * init_std
        self.embedding = nnx.Param(w.astype(param_dtype), out_sharding=tuple(names))

    def __call__(self, ids):
        # jnp.take (a gather) beats a one-hot matmul on CPU (BENCHMARKS.md: +9%).
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x_btd, out_dtype=None):
        """Logits against the table (a tied LM head): `x . embedding^T` (in `out_dtype`)."""
        w = self.embedding[...]
        return _matmul(x_btd.astype(self.dtype), w.T, 1, self.dtype, key=w, out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + scale); gemma stores scale as w with offset 1."""

    def __init__(
        self, dim: int, *, eps: float = 1e-6, offset: float = 0.0, param_dtype=jnp.float32
    ):
        self.eps = float(eps)
        self.offset = float(offset)
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, param_dtype), out_sharding=("norm",))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / std * (offset + scale) + bias."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        offset: float = 0.0,
        use_bias: bool = True,
        param_dtype=jnp.float32,
    ):
        self.eps = float(eps)
        self.offset = float(offset)
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, param_dtype), out_sharding=("norm",))
        self.bias = (
            nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",)) if use_bias else None
        )

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * (self.offset + self.scale[...].astype(jnp.float32))
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None):
    """The norm a config asks for."""
    dim = cfg.d_model if dim is None else dim
    pdt = dtype_of(cfg.param_dtype)
    if cfg.norm == "rms":
        return RMSNorm(dim, eps=cfg.norm_eps, offset=cfg.norm_offset, param_dtype=pdt)
    return LayerNorm(
        dim, eps=cfg.norm_eps, offset=cfg.norm_offset, use_bias=cfg.norm_bias, param_dtype=pdt
    )


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (HF "rotate_half" convention)
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies [head_dim/2] (float32), with HF `linear` or `llama3` rope_scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = "default" if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        pass
    elif kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    else:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (linear, llama3).")
    return inv.astype(np.float32)


def rope_cos_sin(positions_bt, inv_freq) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, 1, Dh/2] (float32), broadcast over heads."""
    ang = positions_bt.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]


def apply_rope(x_btnh, cos, sin):
    """Rotates the two halves of the head dim (HF `rotate_half`), in float32."""
    xf = x_btnh.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """Multi-head attention with grouped KV heads (GQA/MQA), rotary, QK-norm, softcap, KV cache.

    Without a cache the mask is an `attention.TrainMask` built once per forward by the
    transformer and the math is the backend of `cfg.attention` (fft.models.attention). With a
    cache it is an additive float32 bias `[B, 1, 1, T, S]` (adding it beats a `where` on CPU).
    The q/k/v projections are named 'query_proj', 'key_proj', 'value_proj' for the
    `save_qkv` remat policy.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kw = dict(
            dtype=dtype_of(cfg.dtype),
            param_dtype=dtype_of(cfg.param_dtype),
            quant=cfg.quant,
            quant_block=cfg.quant_block,
            rngs=rngs,
        )
        self.q = Linear(
            (d,), (h, dh), names=("embed", "heads", "head_dim"), use_bias=cfg.qkv_bias, **kw
        )
        self.k = Linear(
            (d,), (k, dh), names=("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, **kw
        )
        self.v = Linear(
            (d,), (k, dh), names=("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, **kw
        )
        self.o = Linear(
            (h, dh), (d,), names=("heads", "head_dim", "embed"), use_bias=cfg.o_bias, **kw
        )
        if cfg.qk_norm:
            # qwen3/gemma3: one norm over head_dim shared by all heads (the config's norm kind,
            # so gemma's (1 + w)), on q and k after the projection and before rope.
            self.q_norm = make_norm(cfg, dh)
            self.k_norm = make_norm(cfg, dh)
        self.qk_norm = cfg.qk_norm
        self.n_heads, self.n_kv_heads, self.head_dim = h, k, dh
        self.scale = float(cfg.query_scale if cfg.query_scale is not None else dh**-0.5)
        self.softcap = float(cfg.attn_softcap)
        self.use_rope = cfg.pos == "rope"
        self.impl = cfg.attention  # resolved at trace time, for the platform being compiled for
        self.dtype = dtype_of(cfg.dtype)

    def __call__(self, x_btd, cos, sin, bias, kv=None, index=None):
        """Attends `x` to itself, or (with `kv`) to the KV cache after writing x's keys/values.

        Args:
          x_btd: normalized input.
          cos, sin: rotary tables `[B, T, 1, Dh/2]` (ignored without rope).
          bias: an `attention.TrainMask` without cache; with it an additive mask `[B,1,1,T,S]`.
          kv: optional `(k_bksh, v_bksh)` cache of this layer.
          index: int32 scalar, slot of the first of the T new tokens in the cache.

        Returns:
          (out_btd, new kv or None)
        """
        q_btnh = sharding.constrain(self.q(x_btd), ("batch", "length", "act_heads", None))
        k_btkh = sharding.constrain(self.k(x_btd), ("batch", "length", "act_kv_heads", None))
        v_btkh = sharding.constrain(self.v(x_btd), ("batch", "length", "act_kv_heads", None))
        q_btnh = checkpoint_name(q_btnh, "query_proj")
        k_btkh = checkpoint_name(k_btkh, "key_proj")
        v_btkh = checkpoint_name(v_btkh, "value_proj")
        if self.qk_norm:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        if self.use_rope:
            q_btnh, k_btkh = apply_rope(q_btnh, cos, sin), apply_rope(k_btkh, cos, sin)

        if kv is not None:
            q_btnh = q_btnh * jnp.asarray(self.scale, q_btnh.dtype)
            k_cache, v_cache = kv
            start = (0, 0, index, 0)
            k_bksh = jax.lax.dynamic_update_slice(
                k_cache, k_btkh.transpose(0, 2, 1, 3).astype(k_cache.dtype), start
            )
            v_bksh = jax.lax.dynamic_update_slice(
                v_cache, v_btkh.transpose(0, 2, 1, 3).astype(v_cache.dtype), start
            )
            out_btnh = self._attend_cache(q_btnh, k_bksh, v_bksh, bias, index)
            new_kv = (k_bksh, v_bksh)
        else:
            out_btnh = attention.attend(
                attention.resolve(self.impl, self.dtype),
                q_btnh,
                k_btkh,
                v_btkh,
                bias,
                softcap=self.softcap,
                scale=self.scale,
            )
            new_kv = None
        out_btnh = sharding.constrain(out_btnh, ("batch", "length", "act_heads", None))
        return self.o(out_btnh), new_kv

    def _probs(self, scores, bias):
        if self.softcap:
            scores = jnp.tanh(scores / self.softcap) * self.softcap
        return jax.nn.softmax(scores + bias, axis=-1)

    def _attend_cache(self, q_btnh, k_bksh, v_bksh, bias, index=None):
        b, t = q_btnh.shape[:2]
        g = self.n_heads // self.n_kv_heads
        if t == 1:
            # Decode: the length-1 query axis squeezed out makes the score dot a plain batched
            # matvec over the [B,K,S,Dh] cache (BENCHMARKS.md: 140 us instead of 530 us).
            q_bkgh = q_btnh.reshape(b, self.n_kv_heads, g, self.head_dim)
            if not self.softcap and index is not None:
                out = cpu_kernels.decode_attention(q_bkgh, k_bksh, v_bksh, bias[:, 0, 0, 0], index)
                if out is not None:
                    return out.reshape(b, 1, self.n_heads, self.head_dim).astype(self.dtype)
            s_bkgs = jnp.einsum(
                "bkgh,bksh->bkgs",
                q_bkgh.astype(k_bksh.dtype),
                k_bksh,
                preferred_element_type=jnp.float32,
            )
            p_bkgs = self._probs(s_bkgs, bias[:, :, :, 0, :]).astype(v_bksh.dtype)
            out = jnp.einsum("bkgs,bksh->bkgh", p_bkgs, v_bksh)
            return out.reshape(b, 1, self.n_heads, self.head_dim).astype(self.dtype)
        q_btkgh = q_btnh.reshape(b, t, self.n_kv_heads, g, self.head_dim)
        s_bkgts = jnp.einsum(
            "btkgh,bksh->bkgts",
            q_btkgh.astype(k_bksh.dtype),
            k_bksh,
            preferred_element_type=jnp.float32,
        )
        p_bkgts = self._probs(s_bkgts, bias).astype(v_bksh.dtype)
        out = jnp.einsum("bkgts,bksh->btkgh", p_bkgts, v_bksh)
        return out.reshape(b, t, self.n_heads, self.head_dim).astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------


class MLP(nnx.Module):
    """Gated (`swiglu`/`geglu`: act(gate(x)) * up(x)) or plain (`gelu`: act(up(x))) MLP."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        kw = dict(
            dtype=dtype_of(cfg.dtype),
            param_dtype=dtype_of(cfg.param_dtype),
            use_bias=cfg.mlp_bias,
            quant=cfg.quant,
            quant_block=cfg.quant_block,
            rngs=rngs,
        )
        self.gated = cfg.mlp in ("swiglu", "geglu")
        if self.gated:
            self.gate = Linear((d,), (f,), names=("embed", "mlp"), **kw)
        self.up = Linear((d,), (f,), names=("embed", "mlp"), **kw)
        self.down = Linear((f,), (d,), names=("mlp", "embed"), **kw)
        self.act = cfg.act

    def __call__(self, x_btd):
        act = activation(self.act)
        h_btf = act(self.gate(x_btd)) * self.up(x_btd) if self.gated else act(self.up(x_btd))
        h_btf = sharding.constrain(h_btf, ("batch", "length", "act_mlp"))
        return self.down(h_btf)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def attention_bias(segment_ids_bt, window: int = 0):
    """Additive mask [B,1,1,T,T]: causal, equal nonzero segment ids, optional sliding window."""
    return attention.causal_bias(segment_ids_bt, window)


def cache_bias(valid_bs, index, t: int, window: int = 0):
    """Additive mask [B,1,1,T,S] for T queries at cache slots index..index+T-1."""
    s = valid_bs.shape[1]
    slots = jnp.arange(s)
    q_slots = index + jnp.arange(t)
    ok = slots[None, :] <= q_slots[:, None]
    if window:
        ok = ok & (q_slots[:, None] - slots[None, :] < window)
    ok = ok[None] & valid_bs[:, None, :]
    return jnp.where(ok, 0.0, NEG_INF).astype(jnp.float32)[:, None, None]
