"""Train-time attention backends, one function per name, chosen by `ModelConfig.attention`.

Every backend computes causal (or full) attention of one packed batch without a KV cache:

    fn(q_btnh, k_btkh, v_btkh, *, segment_ids, window, softcap, scale, causal=True, bias=None)
      -> out_btnh

with `N = G * K` query heads over `K` key/value heads (GQA), `segment_ids [B, T]` (a query sees
keys of its own segment; 0 = padding), `window` (0 = global; else a query sees the last `window`
positions, itself included), `softcap` (0 = off; scores = c * tanh(scores / c)) and `scale` (the
query scale; every backend multiplies q by it in q's dtype first, as the model always did).

- `xla`: dense float32 scores `[B,K,G,T,S]` plus the additive bias of `causal_bias` (built once
  per forward by the transformer and passed as `bias`). The reference; the only one that runs
  everywhere at any shape.
- `cudnn`: `jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")`, no dense mask:
  sliding windows as `local_window_size`, right padding as `query_seq_lengths` /
  `key_value_seq_lengths`. Falls back to `xla`, logged once, when it cannot say the mask:
  a logit softcap (the fused kernel has none); and, decided per batch by a `lax.cond` since
  packing is data, rows with more than one segment or with left padding (jax 0.10's
  `dot_product_attention` has lengths but no segment ids or offsets). Off a GPU or in float32
  the same call runs JAX's XLA implementation (so the logic is tested on CPU).
- `splash`: the Pallas TPU splash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`),
  causal or local mask, segment ids for packed rows, GQA, softcap; `shard_map`ped over the
  batch and head axes of the active mesh. Needs T a multiple of 128 (TPU tiles), else `xla`.
  Off a TPU it runs in Pallas interpret mode (slow; that is how the tests check it on CPU).
- `flash`: this module's own Pallas flash attention (`flash_attention`): blockwise online
  softmax, causal + segment ids + GQA + sliding window + softcap, any T (padded to the block);
  backward by recomputation (a blockwise pure-JAX pass from the saved log-sum-exp). Runs in
  interpret mode off GPU/TPU.
- `auto`: `splash` on TPU, `cudnn` on GPU with a 16-bit compute dtype, else `xla`, resolved
  when the model is traced, for the platform of the active mesh (`platform()`).

Padding query rows (segment 0) are don't-care: `xla` gives them a uniform average, the
kernels their own finite values; losses mask them.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from fft import sharding
from fft.config_lib import ConfigError

log = logging.getLogger(__name__)

# An additive mask value: finite so that a fully masked row (a left-pad query) gives a uniform
# softmax instead of NaN, and large enough that exp() of it is exactly 0.
NEG_INF = -1e30

BACKENDS: dict[str, Callable] = {}
NAMES = ("auto", "xla", "cudnn", "splash", "flash")


def register(name: str):
    """Decorator: registers an attention backend under `name` (see the module docstring)."""

    def wrap(fn):
        BACKENDS[name] = fn
        return fn

    return wrap


@functools.cache
def _log_once(msg: str) -> None:
    log.warning(msg)


def platform() -> str:
    """The platform traced code targets: the active mesh's (so an AOT compile for a TPU
    topology from a CPU host picks the TPU kernels), else `jax.default_backend()`."""
    ctx = sharding.current()
    if ctx is not None:
        return ctx[0].devices.flat[0].platform
    return jax.default_backend()


def resolve(name: str, dtype) -> str:
    """The backend that `name` means here: `auto` by `platform()` and dtype.

    Args:
      name: a `ModelConfig.attention` value.
      dtype: the compute dtype (name or numpy dtype).

    Returns:
      A key of `BACKENDS`; the choice for `auto` is logged once.
    """
    if name not in NAMES:
        raise ConfigError(f"model.attention={name!r} is not one of {NAMES}.")
    if name != "auto":
        return name
    where = platform()
    if where == "tpu":
        chosen = "splash"
    elif where == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        chosen = "cudnn"
    else:
        chosen = "xla"
    _log_once(f"attention: auto -> {chosen} ({where}, {jnp.dtype(dtype).name})")
    return chosen


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def causal_bias(segment_ids_bt, window: int = 0, local=None, causal: bool = True):
    """Additive mask `[B,1,1,T,T]`: causal, equal nonzero segment ids, optional sliding window.

    Args:
      segment_ids_bt: `[B, T]` int, 0 = padding.
      window: sliding window (0 = none).
      local: optional traced bool; the window applies only where it is True.
      causal: mask the future.
    """
    t = segment_ids_bt.shape[1]
    idx = jnp.arange(t)
    ok = idx[:, None] >= idx[None, :] if causal else jnp.ones((t, t), bool)
    if window:
        inside = idx[:, None] - idx[None, :] < window
        ok = ok & (inside if local is None else inside | ~local)
    seg = segment_ids_bt
    ok = ok[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    return jnp.where(ok, 0.0, NEG_INF).astype(jnp.float32)[:, None, None]


@flax.struct.dataclass
class TrainMask:
    """What a backend needs to mask one forward: built once by the transformer, per layer kind.

    Attributes:
      segment_ids: `[B, T]` int32, 0 = padding.
      bias: `causal_bias` `[B,1,1,T,T]` for the `xla` backend, else None.
      is_local: None (the static `window` applies), or a traced bool (a scan over mixed
        local/global layers): the window applies only where True.
      window: static sliding window of this layer kind (0 = global).
    """

    segment_ids: jax.Array
    bias: jax.Array | None = None
    is_local: jax.Array | None = None
    window: int = flax.struct.field(pytree_node=False, default=0)


def train_mask(backend: str, segment_ids_bt, window: int = 0) -> TrainMask:
    """The mask of one layer kind; the dense bias only when `backend` (resolved) is `xla`."""
    bias = causal_bias(segment_ids_bt, window) if backend == "xla" else None
    return TrainMask(segment_ids=segment_ids_bt, bias=bias, window=window)


def select_mask(is_local, local: TrainMask, glob: TrainMask) -> TrainMask:
    """One mask for a layer whose kind is the traced `is_local` (scan over gemma2's layers)."""
    bias = None if local.bias is None else jnp.where(is_local, local.bias, glob.bias)
    return TrainMask(local.segment_ids, bias, jnp.asarray(is_local), local.window)


def attend(backend: str, q_btnh, k_btkh, v_btkh, mask: TrainMask, *, softcap: float, scale: float):
    """Runs `backend` on one layer's q/k/v with `mask` (a traced layer kind -> `lax.cond`)."""
    fn = BACKENDS[backend]
    kw = dict(segment_ids=mask.segment_ids, softcap=softcap, scale=scale, bias=mask.bias)
    if mask.is_local is None or not mask.window or mask.bias is not None:
        # The bias (xla) already holds the per-layer window; static windows need no branch.
        return fn(q_btnh, k_btkh, v_btkh, window=mask.window, **kw)
    return jax.lax.cond(
        mask.is_local,
        lambda q, k, v: fn(q, k, v, window=mask.window, **kw),
        lambda q, k, v: fn(q, k, v, window=0, **kw),
        q_btnh,
        k_btkh,
        v_btkh,
    )


def _scaled(q, scale):
    return q * jnp.asarray(scale, q.dtype)


# ---------------------------------------------------------------------------------------------
# xla: dense scores (the reference)
# ---------------------------------------------------------------------------------------------


@register("xla")
def xla_attention(
    q_btnh, k_btkh, v_btkh, *, segment_ids, window, softcap, scale, causal=True, bias=None
):
    """Dense float32 scores + additive bias (the model's original attention, same numerics)."""
    b, t, n, h = q_btnh.shape
    k_heads = k_btkh.shape[2]
    if bias is None:
        bias = causal_bias(segment_ids, window, causal=causal)
    q_btkgh = _scaled(q_btnh, scale).reshape(b, t, k_heads, n // k_heads, h)
    s_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_btkh, preferred_element_type=jnp.float32)
    if softcap:
        s_bkgts = jnp.tanh(s_bkgts / softcap) * softcap
    p_bkgts = jax.nn.softmax(s_bkgts + bias, axis=-1).astype(v_btkh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", p_bkgts, v_btkh)
    return out.reshape(b, t, n, h)


# ---------------------------------------------------------------------------------------------
# cudnn: jax.nn.dot_product_attention with is_causal + lengths
# ---------------------------------------------------------------------------------------------


def _single_segment(segment_ids_bt):
    """True where every row is one segment from position 0, then right padding (ids 1..1 0..0)."""
    seg = segment_ids_bt
    ones_then_zeros = jnp.all((seg == 0) | (seg == 1)) & jnp.all(seg[:, 1:] <= seg[:, :-1])
    return ones_then_zeros & jnp.all(seg[:, 0] == 1)


@register("cudnn")
def cudnn_attention(
    q_btnh, k_btkh, v_btkh, *, segment_ids, window, softcap, scale, causal=True, bias=None
):
    """cuDNN fused attention without a dense mask; `xla` where it cannot say the mask."""
    kw = dict(segment_ids=segment_ids, window=window, softcap=softcap, scale=scale, causal=causal)
    if softcap:
        _log_once("attention: cudnn has no logit softcap; softcapped layers run the xla backend")
        return xla_attention(q_btnh, k_btkh, v_btkh, **kw)
    on_gpu = platform() == "gpu" and q_btnh.dtype in (jnp.bfloat16, jnp.float16)
    if not on_gpu:
        _log_once("attention: cudnn needs a GPU and a 16-bit dtype; running JAX's XLA version")

    def fused(q, k, v):
        lengths = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            scale=scale,
            is_causal=causal,
            query_seq_lengths=lengths,
            key_value_seq_lengths=lengths,
            local_window_size=(window - 1, 0) if window else None,
            implementation="cudnn" if on_gpu else None,
        )

    _log_once(
        "attention: cudnn takes no segment ids; batches with packed or left-padded rows run "
        "the xla backend (chosen per batch by lax.cond)"
    )
    return jax.lax.cond(
        _single_segment(segment_ids),
        fused,
        lambda q, k, v: xla_attention(q, k, v, **kw),
        q_btnh,
        k_btkh,
        v_btkh,
    )


# ---------------------------------------------------------------------------------------------
# Pallas kernels under a mesh: one call per shard of batch and heads
# ---------------------------------------------------------------------------------------------


def _mesh_axis(logical: str, dims, mesh):
    """The mesh axes of `logical` that divide every size in `dims` (None = replicate)."""
    entry = sharding.logical_to_spec((logical,), sharding.current()[1])[0]
    axes = entry if isinstance(entry, tuple) else (entry,) if entry is not None else ()
    kept = []
    for a in axes:
        size = math.prod(mesh.shape[x] for x in kept) * mesh.shape[a]
        if all(d % size == 0 for d in dims):
            kept.append(a)
    return None if not kept else kept[0] if len(kept) == 1 else tuple(kept)


def _per_shard(fn, q_btnh, k_btkh, v_btkh, segment_ids_bt):
    """`fn(q, k, v, seg)` under `shard_map` over the active mesh's batch and head axes.

    A Pallas call is opaque to GSPMD, which would gather its operands onto every device; the
    kernel is per (row, head), so each shard runs it on its own rows and heads.
    """
    ctx = sharding.current()
    if ctx is None:
        return fn(q_btnh, k_btkh, v_btkh, segment_ids_bt)
    mesh = ctx[0]
    batch = _mesh_axis("batch", (q_btnh.shape[0],), mesh)
    heads = _mesh_axis("act_heads", (q_btnh.shape[2], k_btkh.shape[2]), mesh)
    qkv = P(batch, None, heads, None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, P(batch, None)),
        out_specs=qkv,
        check_vma=False,
    )(q_btnh, k_btkh, v_btkh, segment_ids_bt)


# ---------------------------------------------------------------------------------------------
# splash: the Pallas TPU kernel
# ---------------------------------------------------------------------------------------------


@register("splash")
def splash_attention(
    q_btnh, k_btkh, v_btkh, *, segment_ids, window, softcap, scale, causal=True, bias=None
):
    """Splash attention (TPU; interpret mode elsewhere); `xla` unless T % 128 == 0."""
    t = q_btnh.shape[1]
    if t % 128:
        _log_once(f"attention: splash needs a length multiple of 128 (got {t}); running xla")
        return xla_attention(
            q_btnh,
            k_btkh,
            v_btkh,
            segment_ids=segment_ids,
            window=window,
            softcap=softcap,
            scale=scale,
            causal=causal,
        )

    def run(q, k, v, seg):
        kernel = _splash_kernel(q.shape[2], t, window, float(softcap), causal, platform() != "tpu")
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

        out_bnth = jax.vmap(kernel)(
            _scaled(q, scale).transpose(0, 2, 1, 3),
            k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3),
            segment_ids=SegmentIds(seg, seg),
        )
        return out_bnth.transpose(0, 2, 1, 3)

    return _per_shard(run, q_btnh, k_btkh, v_btkh, segment_ids.astype(jnp.int32))


@functools.cache
def _splash_kernel(n_heads, t, window, softcap, causal, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window:
        one = sa.LocalMask((t, t), window_size=(window - 1, 0 if causal else None), offset=0)
    elif causal:
        one = sa.CausalMask((t, t))
    else:
        one = sa.FullMask((t, t))
    block = min(512, t)
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return sa.make_splash_mha(
        sa.MultiHeadMask([one] * n_heads),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=sizes,
        attn_logits_soft_cap=softcap or None,
        interpret=interpret,
    )


# ---------------------------------------------------------------------------------------------
# flash: our own Pallas kernel (forward) + blockwise recomputation (backward)
# ---------------------------------------------------------------------------------------------


@register("flash")
def flash_backend(
    q_btnh, k_btkh, v_btkh, *, segment_ids, window, softcap, scale, causal=True, bias=None
):
    """The registry entry of `flash_attention`, `shard_map`ped over the active mesh."""

    def run(q, k, v, seg):
        return flash_attention(
            q, k, v, seg, window=window, softcap=softcap, scale=scale, causal=causal
        )

    return _per_shard(run, q_btnh, k_btkh, v_btkh, segment_ids.astype(jnp.int32))


def flash_attention(
    q_btnh,
    k_btkh,
    v_btkh,
    segment_ids_bt,
    *,
    window: int = 0,
    softcap: float = 0.0,
    scale: float = 1.0,
    causal: bool = True,
    block: int = 128,
    interpret: bool | None = None,
):
    """Flash attention: O(T) memory, exact softmax, differentiable.

    Args:
      q_btnh, k_btkh, v_btkh: queries `[B,T,N,H]`, keys/values `[B,T,K,H]`, N a multiple of K.
      segment_ids_bt: `[B,T]` int; a query sees keys with its own id (0 = padding).
      window: sliding window (0 = none); softcap: logit softcap (0 = none); scale: query scale.
      causal: mask the future.
      block: query and key block length (T is padded up to a multiple).
      interpret: Pallas interpret mode; default: off a GPU/TPU.

    Returns:
      `[B,T,N,H]` in q's dtype.
    """
    if interpret is None:
        interpret = platform() not in ("gpu", "tpu")
    t = q_btnh.shape[1]
    blk = min(block, -(-t // 8) * 8)
    pad = -t % blk
    seg = segment_ids_bt.astype(jnp.int32)
    q = _scaled(q_btnh, scale).transpose(0, 2, 1, 3)
    k, v = k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3)
    if pad:
        # Padded keys get id -1, which no real query has.
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    opts = (int(window), float(softcap), bool(causal), blk, bool(interpret))
    out_bnth = _flash(q, k, v, seg, opts)
    return out_bnth[:, :, :t].transpose(0, 2, 1, 3)


def _allowed(q_idx, k_idx, seg_q, seg_k, window, causal):
    ok = seg_q[..., :, None] == seg_k[..., None, :]
    if causal:
        ok = ok & (q_idx[:, None] >= k_idx[None, :])
    if window:
        ok = ok & (q_idx[:, None] - k_idx[None, :] < window)
    return ok


def _flash_kernel(seg_q_ref, seg_k_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, opts):
    window, softcap, causal, blk, _ = opts
    i = pl.program_id(2)
    q = q_ref[...]
    seg_q = seg_q_ref[...]
    q_idx = i * blk + jnp.arange(blk)
    n_k = k_ref.shape[0] // blk

    def body(j, carry):
        m, den, acc = carry
        start = pl.multiple_of(j * blk, blk)
        k = k_ref[pl.ds(start, blk), :]
        v = v_ref[pl.ds(start, blk), :]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
        if softcap:
            s = jnp.tanh(s / softcap) * softcap
        ok = _allowed(q_idx, start + jnp.arange(blk), seg_q, seg_k_ref[pl.ds(start, blk)],
                      window, causal)  # fmt: skip
        s = jnp.where(ok, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = alpha[:, None] * acc + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        return m_new, alpha * den + p.sum(axis=-1), acc

    # Only the key blocks a query block can see: from the window's start to the diagonal.
    lo = jnp.maximum(i * blk - window + 1, 0) // blk if window else 0
    hi = i + 1 if causal else n_k
    m0 = jnp.full((blk,), NEG_INF, jnp.float32)
    init = (m0, jnp.zeros((blk,), jnp.float32), jnp.zeros(q.shape, jnp.float32))
    m, den, acc = jax.lax.fori_loop(lo, hi, body, init)
    seen = den > 0  # a row with no visible key (only padding) gives 0, not NaN
    o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, den, 1.0)[:, None], 0.0).astype(
        o_ref.dtype
    )
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, den, 1.0)), 0.0)


def _flash_forward(q, k, v, seg, opts):
    """The Pallas call: q `[B,N,T,H]`, k/v `[B,K,T,H]` -> (out `[B,N,T,H]`, lse `[B,N,T]`)."""
    b, n, t, h = q.shape
    g = n // k.shape[1]
    blk, interpret = opts[3], opts[4]
    kv_spec = pl.BlockSpec((None, None, t, h), lambda bi, ni, i: (bi, ni // g, 0, 0))
    return pl.pallas_call(
        functools.partial(_flash_kernel, opts=opts),
        grid=(b, n, t // blk),
        in_specs=[
            pl.BlockSpec((None, blk), lambda bi, ni, i: (bi, i)),
            pl.BlockSpec((None, t), lambda bi, ni, i: (bi, 0)),
            pl.BlockSpec((None, None, blk, h), lambda bi, ni, i: (bi, ni, i, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, blk, h), lambda bi, ni, i: (bi, ni, i, 0)),
            pl.BlockSpec((None, None, blk), lambda bi, ni, i: (bi, ni, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n, t), jnp.float32),
        ],
        interpret=interpret,
    )(seg, seg, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, opts):
    return _flash_forward(q, k, v, seg, opts)[0]


def _flash_fwd(q, k, v, seg, opts):
    out, lse = _flash_forward(q, k, v, seg, opts)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(opts, res, do):
    """Recomputes the probabilities one key block at a time from the saved log-sum-exp.

    Per block j: p = exp(s - lse), dv_j = p^T do, dp = do v_j^T, ds = p (dp - rowsum(do o)),
    dq += ds k_j, dk_j = ds^T q (times tanh' under a softcap). Memory O(T * block).
    """
    window, softcap, causal, blk, _ = opts
    q, k, v, seg, out, lse = res
    b, n, t, h = q.shape
    kh = k.shape[1]
    g = n // kh
    q5 = q.reshape(b, kh, g, t, h)
    do5 = do.reshape(b, kh, g, t, h)
    lse5 = lse.reshape(b, kh, g, t)
    delta = jnp.sum(do5.astype(jnp.float32) * out.reshape(q5.shape).astype(jnp.float32), -1)
    n_k = t // blk
    blocks = lambda x: jnp.moveaxis(x.reshape(b, kh, n_k, blk, h), 2, 0)  # noqa: E731
    seg_blocks = jnp.moveaxis(seg.reshape(b, n_k, blk), 1, 0)
    q_idx = jnp.arange(t)

    def step(dq, xs):
        j, k_j, v_j, seg_j = xs
        s = jnp.einsum("bkgth,bksh->bkgts", q5, k_j, preferred_element_type=jnp.float32)
        if softcap:
            cap = jnp.tanh(s / softcap)
            s = cap * softcap
        ok = _allowed(q_idx, j * blk + jnp.arange(blk), seg, seg_j, window, causal)
        p = jnp.where(ok[:, None, None], jnp.exp(s - lse5[..., None]), 0.0)
        dv_j = jnp.einsum("bkgts,bkgth->bksh", p.astype(do.dtype), do5,
                          preferred_element_type=jnp.float32)  # fmt: skip
        dp = jnp.einsum("bkgth,bksh->bkgts", do5, v_j, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None])
        if softcap:
            ds = ds * (1.0 - cap * cap)
        dq = dq + jnp.einsum("bkgts,bksh->bkgth", ds, k_j.astype(jnp.float32))
        dk_j = jnp.einsum("bkgts,bkgth->bksh", ds, q5.astype(jnp.float32))
        return dq, (dk_j, dv_j)

    dq0 = jnp.zeros(q5.shape, jnp.float32)
    xs = (jnp.arange(n_k), blocks(k), blocks(v), seg_blocks)
    dq, (dk, dv) = jax.lax.scan(step, dq0, xs)
    unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, kh, t, h)  # noqa: E731
    return (
        dq.reshape(q.shape).astype(q.dtype),
        unblock(dk).astype(k.dtype),
        unblock(dv).astype(v.dtype),
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)
