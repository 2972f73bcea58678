"""Where a run's starting weights come from: an fft workdir/checkpoint, a local HF directory, or
a llama.cpp `.gguf` file (dequantized by `fft.interop.gguf`).

`load_spec(path)` reads the architecture and tokenizer and returns a `load_weights` function
that the train loop calls with the new model's abstract state and shardings. Loading is partial
by design, never silently: LoRA adapters, new heads and new vocabulary rows keep their fresh
initialisation (the log counts them), while a backbone weight the source lacks is an FFTError
naming it. Names map across `scan_layers` settings (`layers.3.attn…` <-> row 3 of a stacked
`layers.attn…`) and into wrappers (`backbone.layers.0…`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from fft import tokenizers
from fft.config_lib import FFTError
from fft.models import quant
from fft.models.config import ModelConfig
from fft.models.encoder import EncoderConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Spec:
    """What a source provides: architecture, tokenizer, and a partial weight loader."""

    model_config: ModelConfig
    tokenizer: tokenizers.Tokenizer
    load_weights: Callable | None
    kind: str  # 'fft' | 'hf' | 'gguf'


def kind_of(path: str | os.PathLike) -> str:
    """'fft' for an fft workdir / checkpoint dir, 'hf' for a HuggingFace model dir, 'gguf' for
    a `.gguf` file."""
    path = os.fspath(path)
    if path.lower().endswith(".gguf") and os.path.isfile(path):
        return "gguf"
    if os.path.exists(os.path.join(path, "model.json")):
        return "fft"
    if os.path.exists(os.path.join(path, "config.json")) and (
        glob.glob(os.path.join(path, "*.safetensors")) or glob.glob(os.path.join(path, "*.bin"))
    ):
        return "hf"
    raise FFTError(
        f"{path} is neither an fft workdir (model.json + checkpoints/), a HuggingFace model "
        "directory (config.json + *.safetensors) nor a .gguf file."
    )


def load_spec(path: str | os.PathLike) -> Spec:
    """Reads architecture + tokenizer of `path`; weights are read later by `load_weights`.

    `load_weights(abstract_state, shardings=None)` fills every backbone weight or raises
    FFTError naming the missing ones (see `check_loaded`); LoRA adapters, new heads and new
    vocabulary rows keep the caller's fresh init.
    """
    path = os.fspath(path)
    kind = kind_of(path)
    if kind in ("hf", "gguf"):
        from fft.interop import gguf, hf

        model_config, tokenizer, read = (hf if kind == "hf" else gguf).load_spec(path)
        tokenizers.check_fits(
            tokenizer,
            model_config.vocab_size,
            tokenizer_name=path,
            model_name=os.path.join(path, "config.json") if kind == "hf" else path,
        )

        def load_weights(abstract_state, shardings=None):
            loaded = read(abstract_state, shardings)
            check_loaded(abstract_state, loaded, model_config, path)
            return loaded

        return Spec(model_config, tokenizer, load_weights, kind=kind)
    with open(os.path.join(path, "model.json")) as f:
        raw = json.load(f)
    # A QLoRA run's quantization is a runtime option of that run: its checkpoint reads back as
    # dequantized full-precision kernels (`read_raw_params`), so it loads as a plain model.
    raw.pop("quant", None), raw.pop("quant_block", None)
    model_config = (
        EncoderConfig.from_dict(raw) if raw.get("family") == "bert" else ModelConfig.from_dict(raw)
    )
    tokenizer = tokenizers.load_tokenizer(os.path.join(path, "tokenizer"))
    tokenizers.check_fits(
        tokenizer,
        getattr(model_config, "n_tokens", model_config.vocab_size),  # padding rows are no ids
        tokenizer_name=os.path.join(path, "tokenizer"),
        model_name=os.path.join(path, "model.json"),
    )

    def load_weights(abstract_state, shardings=None):
        flat = read_fft_params(path)
        return place(flat, abstract_state, shardings, model_config=model_config, source=path)

    return Spec(model_config, tokenizer, load_weights, kind="fft")


def _path_str(path) -> str:
    # DictKey .key, GetAttrKey .name (a Variable's `value`), SequenceKey .idx (nnx.List items)
    return ".".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def latest_checkpoint(workdir: str | os.PathLike) -> str:
    """The newest complete checkpoint item dir under `workdir/checkpoints` (or workdir itself)."""
    workdir = os.fspath(workdir)
    roots = [os.path.join(workdir, "checkpoints"), workdir]
    for root in roots:
        steps = sorted(
            (int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else [],
            reverse=True,
        )
        for step in steps:
            item = os.path.join(root, str(step), "state")
            if os.path.isdir(item):
                return item
    raise FFTError(f"{workdir}: no checkpoint found under checkpoints/. Did the run save one?")


def read_fft_params(workdir: str | os.PathLike) -> dict[str, np.ndarray]:
    """{'layers.0.attn.q.kernel': array, ...} from an fft workdir's latest checkpoint.

    Trainable and frozen parts are merged, and LoRA adapters are folded into their kernels
    (kernel += a @ b * scale) so the result is a plain set of base weights.
    """
    workdir = os.fspath(workdir)
    return fold_lora(read_raw_params(workdir), _lora_scale(workdir))


def read_raw_params(workdir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Like `read_fft_params`, but LoRA adapters are kept as `X.lora_a` / `X.lora_b`.

    A QLoRA run's quantized kernels (`X.kernel_q` + `X.kernel_scale`) come back dequantized as
    `X.kernel`, in the run's `param_dtype` (the base's dtype as it was loaded).
    """
    item = os.path.abspath(latest_checkpoint(workdir))
    try:
        flat = _read_raw_item(item)
        step_dir = os.path.dirname(item)
        if os.path.exists(os.path.join(step_dir, "frozen_ref")):
            # A LoRA / frozen-base run saves its frozen weights once, next to the steps.
            flat.update(_read_raw_item(os.path.join(os.path.dirname(step_dir), "frozen")))
    except Exception as e:  # noqa: BLE001 - a truncated checkpoint: one error naming it
        from fft import checkpoint  # deferred: orbax is slow to import

        raise checkpoint.unreadable_checkpoint(os.path.dirname(item), e) from None
    if any(n.endswith(".kernel_q") for n in flat):
        flat = quant.dequantize_flat(flat, _param_dtype(os.fspath(workdir)))
    return flat


def _param_dtype(workdir: str) -> np.dtype:
    """The storage dtype model.json records for the run's (unquantized) weights."""
    path = os.path.join(workdir, "model.json")
    if not os.path.exists(path):
        return np.dtype(np.float32)
    with open(path) as f:
        name = json.load(f).get("param_dtype", "float32")
    return np.dtype(jax.numpy.dtype(name))


def _read_raw_item(item: str) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp
    from etils import epath

    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item))
    meta = getattr(meta, "tree", meta)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        # Weights only, as host numpy arrays: no optimizer state, no device shardings to guess.
        want = {p: meta[p] for p in ("params", "frozen") if meta.get(p)}
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), want)
        structure = jax.tree.map(lambda _: np.zeros(()), want)
        tree = ckptr.restore(
            item,
            args=ocp.args.PyTreeRestore(item=structure, restore_args=args, partial_restore=True),
        )
    flat: dict[str, np.ndarray] = {}
    for part in ("params", "frozen"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree.get(part, {})):
            name = _path_str(path)
            # nnx.State leaves are saved as {'value': array} under some flax versions.
            if name.endswith(".value"):
                name = name[: -len(".value")]
            flat[name] = np.asarray(leaf)
    return flat


def _lora_scale(workdir: str) -> float:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return 1.0
    with open(path) as f:
        lora = json.load(f).get("lora", {})
    rank = lora.get("rank", 0)
    if not rank:
        return 1.0
    alpha = lora.get("alpha", rank)
    return alpha / (rank**0.5) if lora.get("rslora") else alpha / rank


def fold_adapter(kernel: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """`kernel + a.b * scale` in the kernel's dtype, for one LoRA pair (the one fold fft has).

    Args:
      kernel: `[in..., out...]`, or `[L, in..., out...]` for scan-stacked layers.
      a: `[in..., r]` (stacked: `[L, in..., r]`).
      b: `[r, out...]` (stacked: `[L, r, out...]`).
      scale: the adapters' `alpha / rank` (or rsLoRA's `alpha / sqrt(rank)`).

    Returns:
      The folded kernel, same shape and dtype as `kernel`.
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    n_lead = a.ndim + b.ndim - 2 - kernel.ndim  # 1 when a and b carry the stacked layer axis
    lead, in_shape, out_shape = a.shape[:n_lead], a.shape[n_lead:-1], b.shape[n_lead + 1 :]
    if n_lead < 0 or tuple(kernel.shape) != lead + in_shape + out_shape or b.shape[:n_lead] != lead:
        raise FFTError(
            f"LoRA adapters a{a.shape} . b{b.shape} do not fit their kernel {kernel.shape}"
        )
    # Flatten in/out so one batched matmul covers plain and stacked pairs alike.
    a2 = a.reshape(lead + (int(np.prod(in_shape)), a.shape[-1]))
    b2 = b.reshape(lead + (b.shape[n_lead], int(np.prod(out_shape))))
    delta = np.matmul(a2, b2).reshape(kernel.shape)
    return (np.asarray(kernel, np.float32) + delta * scale).astype(kernel.dtype)


def fold_lora(flat: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Merges `X.lora_a`/`X.lora_b` pairs into `X.kernel` and drops them (stacked pairs too)."""
    out = dict(flat)
    for name in [n for n in flat if n.endswith(".lora_a")]:
        prefix = name[: -len(".lora_a")]
        a, b = out.pop(name), out.pop(prefix + ".lora_b")
        out[prefix + ".kernel"] = fold_adapter(out[prefix + ".kernel"], a, b, scale)
    return out


# =============================================================================================
# Placing a flat checkpoint into a model: stacked <-> per-layer names, wrappers, loud gaps
# =============================================================================================

# Vocabulary-bearing leaves and their vocab axis: a grown vocabulary keeps the old rows.
_VOCAB_AXIS = {"embed.embedding": 0, "lm_head.kernel": -1}


def _lookup(flat: dict[str, np.ndarray], parts: list[str], shape: tuple) -> np.ndarray | None:
    """The source array for the leaf named `parts`: itself, or the same weight saved with the
    other `scan_layers` setting (`layers.3.attn…` is row 3 of `layers.attn…`; a stacked
    `layers.attn…` is `layers.0.attn…`, `layers.1.attn…`, … stacked)."""
    key = ".".join(parts)
    if key in flat:
        return flat[key]
    for i, part in enumerate(parts[:-1]):
        if part != "layers":
            continue
        nxt = parts[i + 1]
        if nxt.isdigit():  # per-layer target, stacked source
            stacked = flat.get(".".join(parts[: i + 1] + parts[i + 2 :]))
            if stacked is not None and stacked.ndim and int(nxt) < stacked.shape[0]:
                return stacked[int(nxt)]
        elif shape:  # stacked target, per-layer source
            rows = [
                flat.get(".".join([*parts[: i + 1], str(j), *parts[i + 1 :]]))
                for j in range(shape[0])
            ]
            if all(r is not None for r in rows):
                return np.stack(rows)
    return None


def _find(flat: dict[str, np.ndarray], name: str, shape: tuple) -> np.ndarray | None:
    """`_lookup` of `name`, then of its shorter suffixes: a backbone saved on its own fills the
    same leaves nested in a wrapper ('backbone.layers.0…' <- 'layers.0…')."""
    parts = name.split(".")
    for i in range(len(parts)):
        src = _lookup(flat, parts[i:], shape)
        if src is not None:
            return src
    return None


def _vocab_axis(name: str) -> int | None:
    """The vocab axis of a vocabulary-bearing leaf (`embed.embedding`, `lm_head.kernel`)."""
    return next((ax for k, ax in _VOCAB_AXIS.items() if name == k or name.endswith("." + k)), None)


def _grow_vocab(
    name: str, src: np.ndarray, shape: tuple, n_tokens: int | None = None
) -> tuple[np.ndarray, int] | None:
    """(`src` resized along its vocab axis to `shape`, new row count), or None when `name` is no
    vocabulary leaf or the shapes differ otherwise.

    The source's first `n_tokens` rows (default: all; fewer when its vocabulary is padded) are
    kept, every other row of `shape` is the mean of those: a new token starts as an average
    token, and a padding row of the source (never trained) is not taken for a token's row.
    """
    axis = _vocab_axis(name)
    if axis is None or src.ndim != len(shape):
        return None
    old, new = np.moveaxis(src, axis, 0), np.moveaxis(np.empty(shape, src.dtype), axis, 0)
    n = old.shape[0] if n_tokens is None else min(n_tokens, old.shape[0])
    if old.shape[1:] != new.shape[1:] or new.shape[0] < n or new.shape[0] == old.shape[0]:
        return None
    new[:n] = old[:n]
    new[n:] = old[:n].astype(np.float32).mean(axis=0).astype(src.dtype)
    return np.moveaxis(new, 0, axis), new.shape[0] - old.shape[0]


def place(flat, abstract_state, shardings=None, *, model_config=None, source: str = "checkpoint"):
    """An nnx.State with the leaves of `abstract_state` found in `flat`, placed on devices.

    Args:
      flat: `{'layers.0.attn.q.kernel': array}` (per-layer or scan-stacked names; either fills
        either layout).
      abstract_state: nnx.State of the target model (shapes and dtypes).
      shardings: optional pytree of NamedSharding matching `abstract_state`; each array goes
        straight into its sharding, one tensor at a time.
      model_config: the source's architecture. When given, every parameter of that backbone
        must be filled (else FFTError listing what is missing); LoRA adapters and new heads
        keep their fresh init, and the log counts them. A vocabulary leaf of another row count
        keeps the source's real rows (`real_vocab_size`), the other rows get their mean.
      source: names the source in errors and the log.

    Returns:
      An nnx.State with exactly the leaves that were loaded (the caller keeps its init for the
      others).
    """
    shard_flat = {}
    if shardings is not None:
        for path, s in jax.tree_util.tree_leaves_with_path(shardings):
            shard_flat[_path_str(path).removesuffix(".value")] = s

    leaves, wrong, grown = {}, {}, []
    # A padded source (fft-built vocabularies): only its real rows are tokens worth keeping.
    n_tokens = getattr(model_config, "real_vocab_size", 0) or None
    abstract_flat = dict(nnx.to_flat_state(abstract_state))
    for path, var in abstract_flat.items():
        name = ".".join(str(p) for p in path)
        if path[-1] == "kernel_scale":
            continue  # filled with its kernel_q
        if path[-1] == "kernel_q":  # QLoRA: quantize the source's kernel on the host
            _place_quantized(flat, path, abstract_flat, shard_flat, leaves, wrong)
            continue
        value = var.get_value() if hasattr(var, "get_value") else var
        shape, dtype = tuple(value.shape), value.dtype
        src = _find(flat, name, shape)
        if src is None:
            continue
        if tuple(src.shape) != shape:
            resized = _grow_vocab(name, src, shape, n_tokens)
            if resized is None:
                wrong[name] = f"{name}: {tuple(src.shape)} in the source, {shape} in the model"
                continue
            src, n_new = resized
            grown.append(f"{name} ({n_new:+d} rows)")
        arr = src.astype(dtype)
        sharding = shard_flat.get(name)
        if sharding is not None:
            arr = jax.make_array_from_callback(shape, sharding, lambda idx, a=arr: a[idx])
        else:
            arr = jax.numpy.asarray(arr)
        leaves[path] = var.replace(arr) if hasattr(var, "replace") else arr
    loaded = nnx.from_flat_state(leaves)
    if model_config is not None:
        check_loaded(abstract_state, loaded, model_config, source, wrong=wrong, grown=grown)
    return loaded


def _place_quantized(flat, path, abstract_flat, shard_flat, leaves, wrong) -> None:
    """Fills `path` (a `kernel_q`) and its `kernel_scale` from the source's full-precision
    kernel: quantized on the host, one tensor at a time, and each device gets its shard of the
    codes only (`quant.put_quantized`)."""
    name = ".".join(str(p) for p in path)
    base = name[: -len("_q")]
    scale_path = (*path[:-1], "kernel_scale")
    q_var, s_var = abstract_flat[path], abstract_flat[scale_path]
    want = tuple(s_var.get_value().shape)  # the kernel's rank; its in/out dims follow below
    src = _find(flat, base, tuple(q_var.get_value().shape))
    if src is None:
        return
    if src.ndim != len(want):
        wrong[name] = f"{base}: {tuple(src.shape)} in the source does not fit {want} scales"
        return
    try:
        q, s = quant.put_quantized(
            src,
            q_var,
            s_var,
            shard_flat.get(name),
            shard_flat.get(base + "_scale"),
        )
    except (FFTError, ValueError, StopIteration) as e:
        wrong[name] = (
            f"{base}: {tuple(src.shape)} in the source does not quantize into {want} ({e})"
        )
        return
    leaves[path] = q_var.replace(q)
    leaves[scale_path] = s_var.replace(s)


def _backbone_names(model_config) -> set[str]:
    """The parameter names of `model_config`'s bare model, layer indices dropped."""
    from fft.interop import hf  # build_abstract: Transformer, or Encoder for a BERT config

    state = nnx.state(hf.build_abstract(model_config), nnx.Param)
    return {_layerless(".".join(map(str, p))) for p, _ in nnx.to_flat_state(state)}


def _layerless(name: str) -> str:
    """'backbone.layers.3.attn.q.kernel' -> 'backbone.layers.attn.q.kernel' (both layouts)."""
    return re.sub(r"(^|\.)layers\.\d+(?=\.)", r"\1layers", name)


def check_loaded(abstract_state, loaded, model_config, source: str, *, wrong=None, grown=()):
    """Raises FFTError when a backbone parameter of `abstract_state` is not in `loaded`.

    Only LoRA adapters, new heads (leaves outside `model_config`'s model, found by path suffix
    as wrappers nest it) and new vocabulary rows may keep their fresh init; the log says which
    and how many.

    Args:
      abstract_state: nnx.State of the target model.
      loaded: the nnx.State a loader returned for it.
      model_config: the source's architecture (its parameters are the backbone).
      source: the path named in the message.
      wrong: {name: why} for leaves the source has in another shape.
      grown: descriptions of vocabulary leaves whose new rows were added.
    """
    wrong = wrong or {}
    got = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(loaded)}
    backbone = _backbone_names(model_config)
    missing, fresh = [], {"LoRA adapter": [], "new head": []}
    for path, var in nnx.to_flat_state(abstract_state):
        name = ".".join(map(str, path))
        if name in got or not isinstance(var, nnx.Param | quant.QuantWeight):
            continue  # loaded, or not a weight (RNG counters of dropout layers, ...)
        # A quantized kernel's codes and scales are that kernel of the source's backbone.
        parts = re.sub(r"\.kernel_(q|scale)$", ".kernel", _layerless(name)).split(".")
        if path[-1] in ("lora_a", "lora_b"):
            fresh["LoRA adapter"].append(name)
        elif any(".".join(parts[i:]) in backbone for i in range(len(parts))):
            missing.append(wrong.get(name, name))
        else:
            fresh["new head"].append(name)
    if missing:
        shown = "; ".join(missing[:8]) + (
            f"; ... ({len(missing)} in all)" if len(missing) > 8 else ""
        )
        n = f"{len(missing)} weight" + "s" * (len(missing) != 1)
        raise FFTError(
            f"{source}: lacks {n} the model needs (missing, or saved in another shape): "
            f"{shown}. Is it a checkpoint of this architecture?"
        )
    parts = [f"{len(v)} {k}s ({_few(v)})" for k, v in fresh.items() if v]
    parts += [f"new vocabulary rows: {', '.join(grown)}"] if grown else []
    if parts:
        log.info(
            "loaded %d weights from %s; fresh init kept for %s", len(got), source, "; ".join(parts)
        )
    else:
        log.info(
            "loaded %d weights from %s; every weight of the model came from it", len(got), source
        )


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
