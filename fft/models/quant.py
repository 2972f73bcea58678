"""Blockwise quantization of frozen Linear kernels (QLoRA): `int8` and `nf4`, by name.

A quantized `fft.models.layers.Linear` holds, instead of `kernel [in..., out...]`:

    kernel_q      int8 [in..., out...]                 (int8: one code per weight)
                  uint8 [in..., out[:-1]..., out[-1]/2]  (nf4: two 4-bit codes per byte)
    kernel_scale  float32 [in[:-1]..., in[-1]/block, out...]   one absmax per block

Blocks run along the kernel's last input axis (the contraction axis nearest the output), so
`kernel_q` and `kernel_scale` have the kernel's rank and carry its logical axis names: they
shard exactly like the kernel they replace. Both are `QuantWeight` Variables, not `nnx.Param`,
so no trainable filter can select them: quantized weights are frozen by type and only LoRA
adapters train on top. `Linear` dequantizes per matmul (`dequantize`, in the compute dtype).

Codecs (a registry, `CODECS`): `int8` is symmetric absmax (code = round(w / absmax * 127),
error <= absmax / 254 per weight); `nf4` is the NormalFloat4 codebook of QLoRA (Dettmers et al.
2023, the bitsandbytes table): code = the nearest of 16 levels to w / absmax, error <= absmax *
(1 - 0.7230) / 2. Scales stay float32 (no double quantization): nf4 costs 4 + 32 / block bits
per weight, 4.5 at the default block of 64.

Every function takes numpy or jax arrays and returns the same kind, so the loaders quantize on
the host, one tensor at a time, and the jitted random init quantizes on device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft.config_lib import ConfigError

# NormalFloat4: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, appendix E;
# the values bitsandbytes ships).
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
_NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2


class QuantWeight(nnx.Variable):
    """Quantized storage of a frozen kernel (codes or per-block scales); never trainable."""


@dataclasses.dataclass(frozen=True)
class Codec:
    """How one quantization kind maps `w / absmax` in [-1, 1] to codes and back."""

    encode: Callable  # (xp, x in [-1, 1]) -> codes (storage dtype, unpacked)
    decode: Callable  # (xp, codes unpacked) -> float32 values in [-1, 1]
    dtype: np.dtype  # storage dtype of kernel_q
    per_byte: int  # codes packed in one byte along the last axis
    max_error: float  # |w - dequantize(quantize(w))| <= max_error * block absmax


CODECS: dict[str, Codec] = {}


def register(name: str, codec: Codec) -> Codec:
    """Adds a quantization kind (a `model.quant` name)."""
    CODECS[name] = codec
    return codec


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


register(
    "int8",
    Codec(
        encode=lambda xp, x: xp.clip(xp.round(x * 127.0), -127, 127).astype(np.int8),
        decode=lambda xp, q: q.astype(np.float32) / 127.0,
        dtype=np.dtype(np.int8),
        per_byte=1,
        max_error=0.5 / 127.0,
    ),
)
register(
    "nf4",
    Codec(
        # searchsorted over the midpoints = index of the nearest level.
        encode=lambda xp, x: xp.searchsorted(xp.asarray(_NF4_MIDPOINTS), x).astype(np.uint8),
        decode=lambda xp, q: xp.asarray(NF4)[q.astype(np.int32)],
        dtype=np.dtype(np.uint8),
        per_byte=2,
        max_error=float(np.max(np.diff(NF4)) / 2),
    ),
)
NAMES = ("none", *CODECS)


def codec(kind: str) -> Codec:
    """The codec of a `model.quant` name (ConfigError for an unknown one)."""
    if kind not in CODECS:
        raise ConfigError(f"model.quant={kind!r}: choose one of {NAMES}.")
    return CODECS[kind]


def block_for(in_last: int, block: int) -> int:
    """The block length along an input axis of size `in_last`: `block`, or the whole axis when
    it is shorter (e.g. the `o` projection's head_dim of a small model)."""
    bs = min(int(block), int(in_last))
    if in_last % bs:
        raise ConfigError(
            f"model.quant_block={block} does not divide a kernel's input axis of {in_last}; "
            "use a power of two that does (e.g. 64)."
        )
    return bs


def _pack(xp, codes, per_byte: int):
    if per_byte == 1:
        return codes
    if codes.shape[-1] % 2:
        raise ConfigError(
            f"nf4 packs two codes per byte: a kernel's last axis {codes.shape} is odd"
        )
    lo, hi = codes[..., 0::2], codes[..., 1::2]
    return (lo | (hi << 4)).astype(np.uint8)


def _unpack(xp, packed, per_byte: int):
    if per_byte == 1:
        return packed
    lo, hi = packed & 15, packed >> 4
    return xp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize(w, kind: str, n_out: int, block: int = 64):
    """Blockwise-quantizes a kernel.

    Args:
      w: `[lead..., in..., out...]` float kernel (numpy or jax); `lead` = scan-stacked layers.
      kind: a `CODECS` name.
      n_out: number of output axes (the block axis is the input axis just before them).
      block: weights per scale along the last input axis (`block_for`).

    Returns:
      `(q, scale)`: codes in the codec's storage dtype (nf4: packed along the last axis) and
      float32 scales `[lead..., in[:-1]..., in[-1] / block, out...]`.
    """
    xp, c = _xp(w), codec(kind)
    axis = w.ndim - n_out - 1  # the last input axis
    bs = block_for(w.shape[axis], block)
    split = w.shape[:axis] + (w.shape[axis] // bs, bs) + w.shape[axis + 1 :]
    wb = w.astype(np.float32).reshape(split)
    absmax = xp.max(xp.abs(wb), axis=axis + 1)
    scale = xp.where(absmax > 0, absmax, 1.0).astype(np.float32)
    codes = c.encode(xp, wb / xp.expand_dims(scale, axis + 1)).reshape(w.shape)
    return _pack(xp, codes, c.per_byte), scale


def dequantize(q, scale, dtype=jnp.float32):
    """The kernel `q` and `scale` stand for, in `dtype` (the kind follows from `q.dtype`).

    Args:
      q: int8 codes, or uint8 packed nf4 codes, as `quantize` returns them.
      scale: their float32 scales; the block axis is the one where `scale` is shorter.

    Returns:
      `[lead..., in..., out...]` in `dtype`.
    """
    xp = _xp(q)
    kind = "int8" if q.dtype == np.int8 else "nf4"
    c = CODECS[kind]
    codes = _unpack(xp, q, c.per_byte)
    # The block axis: where the scales are fewer than the codes (the last input axis).
    axis = next(
        (i for i, (a, b) in enumerate(zip(codes.shape, scale.shape, strict=True)) if a != b), None
    )
    if axis is None:  # blocks of one weight: a scale per weight
        return (c.decode(xp, codes) * scale).astype(dtype)
    bs = codes.shape[axis] // scale.shape[axis]
    split = codes.shape[:axis] + (scale.shape[axis], bs) + codes.shape[axis + 1 :]
    values = c.decode(xp, codes.reshape(split)) * xp.expand_dims(scale, axis + 1)
    return values.reshape(codes.shape).astype(dtype)


def storage_bytes(shape, kind: str, block: int = 64, n_out: int = 1) -> int:
    """Bytes of `kernel_q` + `kernel_scale` for a kernel of `shape` (for reports)."""
    c = codec(kind)
    axis = len(shape) - n_out - 1
    bs = block_for(shape[axis], block)
    n = math.prod(shape)
    return n * c.dtype.itemsize // c.per_byte + (n // bs) * 4


def quantized_vars(w, kind: str, n_out: int, block: int, names) -> tuple:
    """`(kernel_q, kernel_scale)` QuantWeight Variables of kernel `w`, named like the kernel."""
    q, scale = quantize(w, kind, n_out, block)
    meta = dict(out_sharding=tuple(names), quant=kind)
    return QuantWeight(q, **meta), QuantWeight(scale, **meta)


def logical_size(path_tail: str, value) -> int:
    """The number of weights a `kernel_q` leaf stands for (0 for a `kernel_scale`)."""
    if path_tail == "kernel_scale":
        return 0
    per_byte = 2 if value.dtype == np.uint8 else 1
    return math.prod(value.shape) * per_byte


def dequantize_flat(flat: dict, dtype) -> dict:
    """`{'x.kernel_q', 'x.kernel_scale'}` pairs of a flat `{name: array}` dict -> `'x.kernel'`
    in `dtype` (numpy): what a QLoRA checkpoint holds, as plain base weights."""
    out = dict(flat)
    for name in [n for n in flat if n.endswith(".kernel_q")]:
        prefix = name[: -len(".kernel_q")]
        q, scale = out.pop(name), out.pop(prefix + ".kernel_scale")
        out[prefix + ".kernel"] = dequantize(np.asarray(q), np.asarray(scale), np.float32).astype(
            dtype
        )
    return out


def put_quantized(src: np.ndarray, q_var, scale_var, q_sharding=None, scale_sharding=None):
    """Quantizes a host kernel into the shapes of abstract `q_var` / `scale_var` and places
    each straight into its sharding (`jax.make_array_from_callback`): the device only ever
    receives its shard of the codes, never the full-precision tensor.

    Returns:
      `(q, scale)` jax arrays.
    """
    q_shape = tuple(q_var.get_value().shape)
    s_shape = tuple(scale_var.get_value().shape)
    kind = "int8" if q_var.get_value().dtype == np.int8 else "nf4"
    # n_out is not stored: the scale's block axis is the only one shorter than the kernel's.
    full = np.asarray(src, np.float32)
    axis = next(i for i, (a, b) in enumerate(zip(full.shape, s_shape, strict=False)) if a != b)
    q, scale = quantize(full, kind, full.ndim - axis - 1, full.shape[axis] // s_shape[axis])
    if q.shape != q_shape or scale.shape != s_shape:
        raise ConfigError(
            f"quantized kernel {full.shape} -> {q.shape}/{scale.shape}, the model wants "
            f"{q_shape}/{s_shape}"
        )
    return _place(q, q_sharding), _place(scale, scale_sharding)


def _place(arr: np.ndarray, sharding):
    if sharding is None:
        return jnp.asarray(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])
