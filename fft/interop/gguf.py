"""GGUF (llama.cpp's one-file format) -> fft: architecture, weights and tokenizer.

A `.gguf` holds metadata (shapes, rope base, norm epsilon, the tokenizer) and tensors, each
quantized or not. Loading reuses the HF path: every GGUF tensor is renamed to the HF tensor it
came from (the `gguf` package's own name table, `gguf.get_tensor_name_map`), dequantized to
float32 with `gguf.quants.dequantize`, and handed to `hf.read_params` through its `reader=`
hook, so the HF layout table (`hf_layout.py`) does the transposes and scan stacking.

Two things GGUF does not say, and fft states here:
- llama.cpp's converter stores Q and K of Llama-family models with the rows of each head
  permuted (interleaved rotary halves, its own rope layout); fft uses HF's rotate-half order,
  so those rows are permuted back on the way in (`unpermute_qk`) and again on the way out.
- The block's wiring (norm kind, gated MLP, biases) is hard-coded per architecture in
  llama.cpp, so `_FAMILY` lists it for each architecture fft reads, and `_gemma3` the Gemma 3
  settings llama.cpp hard-codes rather than stores (layer pattern, local rope base, query scale).
- llama.cpp's Gemma converter stores every norm weight as `1 + w` (its rms norm has no offset);
  fft keeps HF's `w` with `norm_offset=1`, so 1 is taken off on the way in and added on the way
  out (`norm_shift`).

Supported `general.architecture`: llama (SmolLM2, Llama 2/3 without rope_freqs, Mistral-as-
llama), qwen2, qwen3 and gemma3 (text; fft family `gemma3_text`, HF's model_type).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from fft.config_lib import FFTError
from fft.models.config import ModelConfig

log = logging.getLogger(__name__)

# What llama.cpp hard-codes per architecture (GGUF stores none of it). Biases are not listed:
# they are read from the tensors present (qwen2 files carry q/k/v biases, llama files none).
_FAMILY = {
    "llama": dict(norm="rms", mlp="swiglu", act="silu", pos="rope"),
    "qwen2": dict(norm="rms", mlp="swiglu", act="silu", pos="rope"),
    "qwen3": dict(norm="rms", mlp="swiglu", act="silu", pos="rope", qk_norm=True),
    "gemma3": dict(
        norm="rms", norm_offset=1.0, mlp="geglu", act="gelu_tanh", pos="rope", embed_scale=True,
        post_norms=True, qk_norm=True,
    ),
}  # fmt: skip
SUPPORTED = tuple(_FAMILY)
# GGUF architecture -> fft family (HF's model_type) where the two names differ, and back.
_FFT_FAMILY = {"gemma3": "gemma3_text"}
_GGUF_ARCH = {v: k for k, v in _FFT_FAMILY.items()}
# Architectures whose Q/K rows llama.cpp's converter permutes (LlamaModel and its subclasses).
_PERMUTED = ("llama",)
# llama.cpp's defaults when a key is absent (llama-model.cpp): rope base 10000; the rms epsilon
# HF's configs of these families default to.
_ROPE_THETA = 10000.0
_RMS_EPS = {"llama": 1e-5, "qwen2": 1e-6, "qwen3": 1e-6, "gemma3": 1e-6}
# Gemma 3 as llama.cpp hard-codes it (llama-model.cpp, LLM_ARCH_GEMMA3): every 6th layer global,
# sliding layers rotate with base 10000 (unscaled), the query scale is head_dim ** -0.5 except
# for the 27B model (d_model 5376), whose is (d_model / n_heads) ** -0.5 (HF: query_pre_attn_scalar
# 168). The window itself is stored (`gemma3.attention.sliding_window`); 512 if absent.
_GEMMA3_PATTERN = 6
_GEMMA3_LOCAL_THETA = 10000.0
_GEMMA3_WINDOW = 512
# Families not read yet: one clear error instead of a wrong model.
_NOT_YET = ("gemma", "gemma2")


class GGUFFile:
    """One opened `.gguf`: metadata values and tensors (memory-mapped, read on demand)."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FFTError(f"{self.path}: no such GGUF file")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one error naming it
            raise FFTError(f"{self.path}: not a readable GGUF file ({e!s:.200})") from None
        self.arch = self.value("general.architecture")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def value(self, key: str, default=None):
        """The metadata value under `key` (str, number, bool or list), or `default`."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def arch_value(self, key: str, default=None):
        """The value of `<architecture>.<key>` (e.g. 'block_count')."""
        return self.value(f"{self.arch}.{key}", default)


def gguf_arch(family: str) -> str:
    """The GGUF `general.architecture` of an fft family (`gemma3_text` -> `gemma3`)."""
    return _GGUF_ARCH.get(family, family)


def check_supported(arch: str | None, path: str) -> None:
    """Raises FFTError unless fft can load GGUF architecture `arch`."""
    if arch in _FAMILY:
        return
    if arch in _NOT_YET:
        raise FFTError(
            f"{path}: GGUF architecture {arch!r} is not supported yet: fft reads "
            f"{', '.join(SUPPORTED)} GGUF files; convert the model from its HF directory instead."
        )
    raise FFTError(
        f"{path}: GGUF architecture {arch!r} is not supported; fft reads {', '.join(SUPPORTED)}."
    )


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    """The fft ModelConfig of an opened GGUF (shapes from metadata, wiring from `_FAMILY`)."""
    check_supported(g.arch, g.path)
    n_heads = int(g.arch_value("attention.head_count"))
    d_model = int(g.arch_value("embedding_length"))
    head_dim = int(g.arch_value("attention.key_length", d_model // n_heads))
    rot = g.arch_value("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise FFTError(f"{g.path}: partial rotary ({rot} of {head_dim} dims) is not supported")
    if "rope_freqs.weight" in g.tensors:
        raise FFTError(
            f"{g.path}: llama3-style rope scaling stored as a rope_freqs tensor is not supported"
        )
    vocab = g.arch_value("vocab_size") or len(g.value("tokenizer.ggml.tokens", []))
    if not vocab:
        raise FFTError(f"{g.path}: no vocab_size and no tokenizer.ggml.tokens in the metadata")
    has = g.tensors.__contains__
    kw = dict(
        _FAMILY[g.arch],
        qkv_bias=has("blk.0.attn_q.bias"),
        o_bias=has("blk.0.attn_output.bias"),
        mlp_bias=has("blk.0.ffn_up.bias"),
    )
    if g.arch == "gemma3":
        kw.update(_gemma3(g, d_model, n_heads, head_dim))
    return ModelConfig(
        family=_FFT_FAMILY.get(g.arch, g.arch),
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(g.arch_value("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(g.arch_value("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(g.arch_value("feed_forward_length")),
        max_seq_len=int(g.arch_value("context_length", 2048)),
        norm_eps=_f32(g.arch_value("attention.layer_norm_rms_epsilon", _RMS_EPS[g.arch])),
        rope_theta=_f32(g.arch_value("rope.freq_base", _ROPE_THETA)),
        rope_scaling=_rope_scaling(g),
        # No separate output matrix: llama.cpp unembeds with token_embd, as HF's tied heads do.
        tie_embeddings="output.weight" not in g.tensors,
        **kw,
    )


def _gemma3_defaults(d_model: int, n_heads: int, head_dim: int) -> dict:
    """What llama.cpp assumes of every gemma3 file (see `_GEMMA3_PATTERN`)."""
    scalar = d_model / n_heads if d_model == 5376 else head_dim
    return dict(
        **_FAMILY["gemma3"],
        sliding_window_pattern=_GEMMA3_PATTERN,
        rope_local_theta=_GEMMA3_LOCAL_THETA,
        query_scale=float(scalar) ** -0.5,
        logit_softcap=0.0,
        attn_softcap=0.0,
    )


def config_from_gemma3_defaults(cfg: ModelConfig) -> dict:
    """The settings a gemma3 GGUF of `cfg`'s shapes implies (the export checks `cfg` has them)."""
    return _gemma3_defaults(cfg.d_model, cfg.n_heads, cfg.head_dim)


def _gemma3(g: GGUFFile, d_model: int, n_heads: int, head_dim: int) -> dict:
    """The Gemma 3 settings beyond `_FAMILY`: the stored window, the rest llama.cpp's."""
    out = _gemma3_defaults(d_model, n_heads, head_dim)
    for key in _FAMILY["gemma3"]:
        del out[key]
    return out | dict(sliding_window=int(g.arch_value("attention.sliding_window", _GEMMA3_WINDOW)))


def norm_shift(cfg: ModelConfig, hf_name: str) -> float:
    """What GGUF adds to HF tensor `hf_name`: `norm_offset` for gemma norms, else 0."""
    return cfg.norm_offset if hf_name.endswith("norm.weight") else 0.0


def _f32(x) -> float:
    """A float GGUF stored as float32, as the shortest decimal that float32 reads back
    (9.99999975e-06 -> 1e-05), so configs written from it compare equal to the source's."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _rope_scaling(g: GGUFFile) -> dict | None:
    kind = g.arch_value("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(g.arch_value("rope.scaling.factor"))}
    raise FFTError(f"{g.path}: rope scaling {kind!r} is not supported (fft reads linear)")


def tensor_names(cfg: ModelConfig) -> dict[str, str]:
    """{canonical HF tensor name: GGUF tensor name} for every tensor of `cfg`'s layout."""
    import gguf

    from fft.interop import hf_layout

    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[gguf_arch(cfg.family)]
    table = gguf.get_tensor_name_map(arch, cfg.n_layers)
    out = {}
    for entry in hf_layout.layout(cfg):
        name = table.get_name(entry.hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise FFTError(f"no GGUF name for HF tensor {entry.hf} ({cfg.family})")
        out[entry.hf] = name
    return out


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order -> HF's: per head, rows (pairs, 2) become (2, pairs).

    llama.cpp's converter wrote `w.reshape(n, 2, d/2, ...).swapaxes(1, 2)` per head; this is
    its inverse. Works on `[out, in]` weights and `[out]` biases.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's Q/K row order -> llama.cpp's (the inverse of `unpermute_qk`)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(cfg: ModelConfig, hf_name: str) -> int | None:
    """The head count to (un)permute HF tensor `hf_name` by, or None when it stays as is."""
    if cfg.family not in _PERMUTED:
        return None
    if ".q_proj." in hf_name:
        return cfg.n_heads
    if ".k_proj." in hf_name:
        return cfg.n_kv_heads
    return None


class TensorReader:
    """`hf.read_params`' reader over a GGUF: canonical HF names in, HF-layout float32 out."""

    def __init__(self, g: GGUFFile, cfg: ModelConfig):
        self._g, self._cfg = g, cfg
        names = tensor_names(cfg)
        self._where = {hf: name for hf, name in names.items() if name in g.tensors}
        extra = sorted(set(g.tensors) - set(names.values()))
        if extra:
            log.warning("%s: ignoring %d GGUF tensors: %s", g.path, len(extra), extra[:8])

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        if name not in self._where:
            raise FFTError(f"tensor {name!r} is missing from {self._g.path}")
        t = self._g.tensors[self._where[name]]
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise FFTError(f"{self._g.path}: {t.name}: {e}") from None
        # The reader gives numpy order (ggml's dims reversed), which is HF's [out, in].
        w = np.asarray(w, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        heads = qk_heads(self._cfg, name)
        if heads is not None:
            w = unpermute_qk(w, heads)
        shift = norm_shift(self._cfg, name)
        return w - np.float32(shift) if shift else w


def load_spec(path: str | os.PathLike):
    """(model_config, tokenizer, load_weights) of a `.gguf`, as `hf.load_spec` gives for a dir.

    `load_weights(abstract_state, shardings=None)` dequantizes tensor by tensor and returns the
    leaves it can fill (partial: LoRA adapters, new heads keep their fresh init).
    """
    from fft.interop import gguf_tokenizer, hf

    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    tokenizer = gguf_tokenizer.from_gguf(g)

    def load_weights(abstract_state, shardings=None):
        reader = TensorReader(g, cfg)
        return hf.read_params(g.path, cfg, abstract_state, shardings, strict=False, reader=reader)

    return cfg, tokenizer, load_weights
