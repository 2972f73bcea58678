"""CPU decode kernels through `jax.ffi`: small-batch matmul and attention over the cache.

A decode step reads every weight once for 2·M flops per float (M = batch rows) and the KV
cache once; on the 2-core x86 machines this project measures on, XLA:CPU's dots ran those
M <= 32 shapes at ~7 GB/s (Eigen splits each small dot over the pool at more cost than work)
and its attention read the whole static cache. `cpu_decode.cc` streams each weight once in a
packed `[O/16, I, 16]` layout with 4 x 16 accumulators in registers, reads only the filled
prefix of the cache, and splits the work between the calling thread and XLA's intra-op pool.
Both run at ~13-14 GB/s there, close to what the machine streams (README, Benchmarks).

The library is compiled on first use with the system C++ compiler against the FFI headers that
jaxlib ships, and cached under `$FFT_CACHE/kernels/`. Where that cannot happen (no compiler, no
AVX2/FMA, not x86-64, not the CPU backend, `FFT_CPU_KERNELS=0`), `available()` is False and
callers keep XLA's own code: the kernels are an optimisation, never a requirement.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from absl import logging

import fft

_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_decode.cc")
# FFI target name -> symbol in the library.
_TARGETS = {
    "fft_cpu_small_matmul": "FftCpuSmallMatmul",
    "fft_cpu_pack": "FftCpuPack",
    "fft_cpu_decode_attention": "FftCpuDecodeAttention",
}
MAX_ROWS = 32  # decode batches; prefill-sized matmuls are compute-bound and stay with XLA
STRIP = 16  # output columns per packed strip


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build(cache: str) -> str:
    """Compiles cpu_decode.cc into `cache` (once per source, jaxlib version and compiler)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler (c++/g++) on PATH")
    with open(_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + jax.lib.__version__.encode() + cxx.encode())
    lib = os.path.join(cache, f"libfft_cpu_{key.hexdigest()[:16]}.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(cache, exist_ok=True)
    logging.info("Building fft's CPU decode kernels into %s (once; a few seconds).", lib)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [cxx, "-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w",
           "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        error = proc.stderr[-2000:] if proc.returncode else ""
    except OSError as e:
        error = str(e)
    if error:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{error}")
    os.replace(tmp, lib)  # atomic: concurrent builders each write their own temp file
    return lib


@functools.cache
def available() -> bool:
    """True when the kernel is built and registered for this process (see module doc)."""
    if os.environ.get("FFT_CPU_KERNELS", "1") == "0":
        return False
    if jax.default_backend() != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not {"avx2", "fma"} <= _cpu_flags():
        return False
    try:
        import ctypes

        lib = ctypes.cdll.LoadLibrary(_build(os.path.join(fft.cache_dir(), "kernels")))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
            )
    except Exception as e:  # noqa: BLE001 - any failure means: use XLA's dots
        logging.warning("fft CPU decode kernel unavailable, using XLA dots: %s", e)
        return False
    return True


def pack(w_io: jax.Array) -> jax.Array:
    """`[I, O]` -> `[O/16, I, 16]`: each 16-column strip contiguous, row after row."""
    i, o = w_io.shape
    call = jax.ffi.ffi_call(
        "fft_cpu_pack", jax.ShapeDtypeStruct((o // STRIP, i, STRIP), w_io.dtype)
    )
    return call(w_io)


def small_matmul(x_mi: jax.Array, packed: jax.Array) -> jax.Array:
    """`x[M, I] @ W` for a `pack`ed W; float32, M <= MAX_ROWS (call only when `available()`)."""
    m, o = x_mi.shape[0], packed.shape[0] * STRIP
    call = jax.ffi.ffi_call("fft_cpu_small_matmul", jax.ShapeDtypeStruct((m, o), jnp.float32))
    return call(x_mi.astype(jnp.float32), packed)


# id(weight value) -> packed weight, for the duration of one decode trace (`decode_weights`).
_PACKED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fft_packed", default=None)


@contextlib.contextmanager
def decode_weights(weights):
    """While tracing a decode loop, lets `packed_for(w)` find a packed copy of each weight.

    Args:
      weights: `(w, w_io)` pairs: a traced weight as the model holds it, and the same weight
        as the `[in, out]` matrix its matmul multiplies by. Float32 ones whose out size is a
        multiple of 16 are packed, once, outside the loop (XLA drops the packing of any weight
        the loop never reads). Nothing is registered when the kernel is not `available()`.
    """
    table = None
    if available():
        table = {}
        for w, w_io in weights:
            if w_io.dtype == jnp.float32 and w_io.ndim == 2 and w_io.shape[1] % STRIP == 0:
                table[id(w)] = (w, pack(w_io))
    token = _PACKED.set(table)
    try:
        yield
    finally:
        _PACKED.reset(token)


def packed_for(w: jax.Array, n_rows: int):
    """The packed copy of weight `w` registered by `decode_weights`, if a kernel call with
    `n_rows` rows should replace the dot; else None."""
    table = _PACKED.get()
    if not table or n_rows > MAX_ROWS:
        return None
    hit = table.get(id(w))
    # The value is kept in the table, so its id cannot be reused by another array meanwhile.
    return hit[1] if hit is not None and hit[0] is w else None


def matmul(x: jax.Array, packed: jax.Array, n_in: int, out_shape) -> jax.Array:
    """`tensordot(x, W, n_in)` through the kernel, for `x[..., in...]` with few leading rows."""
    lead = x.shape[: x.ndim - n_in]
    x2 = x.reshape(math.prod(lead), -1)
    return small_matmul(x2, packed).reshape(lead + tuple(out_shape))


def active() -> bool:
    """True while tracing inside `decode_weights` with the kernels available."""
    return _PACKED.get() is not None


def decode_attention(q_bkgd, k_bksd, v_bksd, bias_bs, index) -> jax.Array | None:
    """One decode step of attention over the filled cache prefix, or None (use XLA's).

    `q [B,K,G,D]` (already scaled), cache `k, v [B,K,S,D]` with this step written at slot
    `index`, additive `bias [B,S]` (float32). Reads slots 0..index only: later slots are empty
    and masked, so the result equals the full softmax. Float32 only, D % 8 == 0.
    """
    d = q_bkgd.shape[-1]
    arrays = (q_bkgd, k_bksd, v_bksd, bias_bs)
    if not active() or d % 8 or any(a.dtype != jnp.float32 for a in arrays):
        return None
    call = jax.ffi.ffi_call(
        "fft_cpu_decode_attention", jax.ShapeDtypeStruct(q_bkgd.shape, jnp.float32)
    )
    return call(*arrays, jnp.asarray(index, jnp.int32))
