"""HuggingFace safetensors + config.json <-> fft params, streamed tensor by tensor.

Supported `model_type`s: llama (2/3, rope scaling llama3/linear), mistral, qwen2, gemma, gemma2,
gpt2 (decoders -> `fft.models.transformer.Transformer`) and bert (-> `fft.models.encoder.Encoder`).
The config mapping lives in `hf_config.py`, the tensor tables in `hf_layout.py`.

Loading never holds the model twice in host memory: each HF tensor is read (`safe_open`), turned
into fft layout and placed on devices (`jax.make_array_from_callback` when shardings are given)
before the next one is read. Export writes shard files of at most `max_shard_bytes` each.
"""

from __future__ import annotations

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safe_open can return it)
import numpy as np
from flax import nnx

from fft.config_lib import FFTError
from fft.interop import hf_layout
from fft.interop.hf_config import SUPPORTED, config_from_hf, config_to_hf  # noqa: F401
from fft.interop.hf_layout import Path
from fft.models import quant
from fft.models.encoder import Encoder, EncoderConfig
from fft.pretrained import fold_adapter

log = logging.getLogger(__name__)

# HF tensors that carry nothing fft needs (buffers, pretraining heads, the BERT pooler).
_IGNORED = re.compile(
    r"(^|\.)(rotary_emb\.inv_freq|position_ids|masked_bias|attn\.bias|pooler\..*)$"
    r"|^(cls|classifier|score)\.|^lm_head\.weight$"
)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class _Reader:
    """Finds tensors in `model.safetensors` or the shards an index names; reads one at a time."""

    def __init__(self, directory: str, prefixes: tuple[str, ...]):
        from safetensors import safe_open

        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as fh:
                files = sorted(set(json.load(fh)["weight_map"].values()))
        elif os.path.exists(os.path.join(directory, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FFTError(
                f"no model.safetensors or model.safetensors.index.json in {directory}; fft reads "
                "safetensors only (re-save .bin checkpoints with transformers' save_pretrained)."
            )
        self.directory = directory
        self._handles = {f: safe_open(os.path.join(directory, f), framework="numpy") for f in files}
        self._where: dict[str, tuple[str, str]] = {}  # canonical name -> (file, stored name)
        for file, handle in self._handles.items():
            for stored in handle.keys():
                canon = next(
                    (stored[len(p) :] for p in prefixes if p and stored.startswith(p)), stored
                )
                self._where[canon] = (file, stored)

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise FFTError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
        file, stored = self._where[name]
        return self._handles[file].get_tensor(stored)


def read_hf_config(directory: str) -> dict:
    """The parsed `config.json` of a HF model directory (FFTError if absent)."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FFTError(f"{directory} is not a HuggingFace model directory: no config.json")
    with open(path) as fh:
        return json.load(fh)


def _key(k):
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _flat_paths(tree) -> dict[Path, object]:
    """{(key, ...): leaf} of an nnx.State or nested dict, without the Variables' `.value` key."""
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(_key(k) for k in keypath)
        out[keys[:-1] if keys and keys[-1] == "value" else keys] = leaf
    return out


def build_abstract(cfg):
    """An abstract (shape-only) fft model: `Encoder` for an EncoderConfig, else `Transformer`."""
    if isinstance(cfg, EncoderConfig):
        return nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
    from fft.models.transformer import Transformer

    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def _match(abstract_paths, path: Path):
    """The abstract path `path` fills: itself, a wrapper's path ending in it (e.g.
    `backbone.layers.0...`), or the scan-stacked leaf (`layers.<rest>`, then returns its row)."""
    if path in abstract_paths:
        return path, None
    for p in abstract_paths.suffixes.get(path, ()):
        return p, None
    if len(path) > 2 and path[0] == "layers" and isinstance(path[1], int):
        stacked = ("layers", *path[2:])
        if stacked in abstract_paths:
            return stacked, path[1]
        for p in abstract_paths.suffixes.get(stacked, ()):
            return p, path[1]
    return None, None


class _Paths(dict):
    """{path: Variable} plus a suffix index for wrapped models."""

    def __init__(self, flat):
        super().__init__(flat)
        self.suffixes: dict[Path, list[Path]] = {}
        for p in flat:
            for k in range(1, len(p)):
                self.suffixes.setdefault(p[k:], []).append(p)


def read_params(
    directory: str, cfg, abstract_state, shardings=None, *, strict: bool = True, reader=None
):
    """Reads the HF tensors of `directory` into the leaves of `abstract_state`.

    Args:
      directory: HF model directory whose config maps to `cfg`.
      cfg: the fft config (from `config_from_hf`, possibly with another param dtype).
      abstract_state: nnx.State of the target model (shapes and dtypes; values may be abstract).
        A wrapper (e.g. a classifier holding the backbone under `backbone`) works: fft paths are
        matched as path suffixes; scan-stacked layers are assembled row by row.
      shardings: optional pytree of NamedSharding matching `abstract_state`.
      strict: raise on any backbone leaf without a tensor or with another shape (else those
        leaves are left out, keeping the caller's fresh init: new heads, LoRA, a grown vocab).
      reader: where the HF tensors come from, if not `directory`'s safetensors: any object with
        `names() -> set[str]` and `get(name) -> np.ndarray` over canonical HF names (no
        `model.` prefix), e.g. `fft.interop.gguf.TensorReader`.

    Returns:
      An nnx.State with exactly the leaves that were loaded.
    """
    flat = _Paths(dict(nnx.to_flat_state(abstract_state)))
    shard_of = _flat_paths(shardings) if shardings is not None else {}
    reader = reader or _Reader(directory, hf_layout.prefixes(cfg))
    loaded: dict[Path, jax.Array] = {}
    stacks: dict[Path, np.ndarray] = {}  # scan-stacked leaves being assembled on the host
    used = set()
    for entry in hf_layout.layout(cfg):
        targets = [_match_quantized(flat, p) for p in entry.paths]
        if all(t is None for t, _ in targets):
            continue
        used.add(entry.hf)
        arrays = entry.to_fft(reader.get(entry.hf))
        for (target, row), arr in zip(targets, arrays, strict=True):
            if target is None:
                continue
            var = flat[target]
            shape = _kernel_shape(flat, target)
            want = shape[1:] if row is not None else shape
            if tuple(arr.shape) != want:
                msg = f"{entry.hf}: shape {arr.shape} does not fit fft {_dotted(target)} {want}"
                if strict:
                    raise FFTError(msg)
                log.warning("%s; keeping its fresh init", msg)
                continue
            # A quantized target (QLoRA) is quantized from the full-precision tensor.
            dtype = np.float32 if target[-1] == "kernel_q" else var.get_value().dtype
            arr = np.asarray(arr).astype(dtype, copy=False)
            if row is not None:
                stacks.setdefault(target, np.zeros(shape, arr.dtype))[row] = arr
            else:
                _put(loaded, flat, shard_of, target, arr)
    for target, arr in stacks.items():
        _put(loaded, flat, shard_of, target, arr)
    extra = sorted(n for n in reader.names() - used if not _IGNORED.search(n))
    if extra:
        log.warning("ignoring %d HF tensors fft does not use: %s", len(extra), extra[:8])
    return nnx.from_flat_state([(p, flat[p].replace(value=v)) for p, v in loaded.items()])


def _match_quantized(flat, path: Path):
    """`_match`, or for a kernel the model holds quantized (QLoRA), its `kernel_q`."""
    target, row = _match(flat, path)
    if target is None and path[-1] == "kernel":
        target, row = _match(flat, (*path[:-1], "kernel_q"))
    return target, row


def _kernel_shape(flat, target: Path) -> tuple:
    """The full-precision shape of `target`: its own, or for a `kernel_q` its codes unpacked
    (the scales have the kernel's rank; only the block axis and the packed last axis differ)."""
    shape = tuple(flat[target].get_value().shape)
    if target[-1] != "kernel_q":
        return shape
    per_byte = 2 if flat[target].get_value().dtype == np.uint8 else 1
    return shape[:-1] + (shape[-1] * per_byte,)


def _put(loaded, flat, shard_of, target: Path, arr: np.ndarray) -> None:
    """Places one host tensor into `loaded[target]` (quantized into codes + scales for a
    `kernel_q` target, each placed into its own sharding)."""
    if target[-1] != "kernel_q":
        loaded[target] = _place(arr, shard_of.get(target))
        return
    scale = (*target[:-1], "kernel_scale")
    loaded[target], loaded[scale] = quant.put_quantized(
        arr, flat[target], flat[scale], shard_of.get(target), shard_of.get(scale)
    )


def _dotted(path: Path) -> str:
    return ".".join(map(str, path))


def _place(arr: np.ndarray, sharding) -> jax.Array:
    """Host tensor -> device array, straight into its shards when a sharding is given."""
    if sharding is None:
        return jnp.asarray(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def load_hf(directory: str, *, dtype=None, shardings=None):
    """Loads a local HuggingFace model directory into fft params.

    Args:
      directory: holds `config.json` and `model.safetensors` (or sharded `model-*.safetensors`
        with `model.safetensors.index.json`).
      dtype: parameter dtype (e.g. jnp.bfloat16); default: float32.
      shardings: optional pytree of NamedSharding matching the param tree (e.g.
        `fft.sharding.state_shardings(nnx.state(build_abstract(cfg), nnx.Param), mesh)`).

    Returns:
      (model_config, params): a ModelConfig (EncoderConfig for bert) and an `nnx.State` of the
      model's Params, ready for `nnx.update(model, params)` or `nnx.merge(graphdef, params)`.

    Raises:
      FFTError: unsupported `model_type`, a missing tensor, or a shape that does not fit.
    """
    cfg = config_from_hf(read_hf_config(directory))
    if dtype is not None:
        cfg = cfg.replace(param_dtype=jnp.dtype(dtype).name)
    abstract = nnx.state(build_abstract(cfg), nnx.Param)
    params = read_params(directory, cfg, abstract, shardings, strict=True)
    missing = sorted(set(dict(nnx.to_flat_state(abstract))) - set(dict(nnx.to_flat_state(params))))
    if missing:
        raise FFTError(f"{directory}: no HF tensor for fft params {[_dotted(p) for p in missing]}")
    return cfg, params


def load_tokenizer(directory: str):
    """The directory's tokenizer via `fft.tokenizers`, or None when it ships none."""
    from fft import tokenizers

    try:
        return tokenizers.load_tokenizer(directory)
    except FFTError as e:
        log.warning("%s; continuing without a tokenizer", e)
        return None


def load_spec(directory: str):
    """(model_config, tokenizer, load_weights) for `fft.pretrained` (weights read on demand).

    `load_weights(abstract_state, shardings=None)` returns the leaves it can fill (partial: new
    heads, LoRA adapters or a resized vocabulary keep their fresh init).
    """
    cfg = config_from_hf(read_hf_config(directory))

    def load_weights(abstract_state, shardings=None):
        return read_params(directory, cfg, abstract_state, shardings, strict=False)

    return cfg, load_tokenizer(directory), load_weights


def load_hf_model(directory: str, *, dtype=None):
    """(model, tokenizer) of a local HF directory: a Transformer (or Encoder for bert)."""
    cfg, params = load_hf(directory, dtype=dtype)
    model = build_abstract(cfg)
    nnx.update(model, params)
    return model, load_tokenizer(directory)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _params_to_export(model_or_state, lora_scale):
    """{path: array} of base weights, LoRA adapters folded in (kernel += a.b * scale)."""
    scales = {}
    if isinstance(model_or_state, nnx.Module):
        from fft.models.lora import lora_modules

        for path, lin in lora_modules(model_or_state, ".*"):
            if hasattr(lin, "lora_a"):  # inside `disable_lora` the base weights are exported
                scale = float(lin.lora_scale) if lin.lora_enabled else 0.0
                scales[tuple(_int(p) for p in path.split("."))] = scale
        state = nnx.state(model_or_state, (nnx.Param, quant.QuantWeight))
        flat = {p: v.get_value() for p, v in nnx.to_flat_state(state)}
    elif isinstance(model_or_state, dict) and all(isinstance(k, str) for k in model_or_state):
        flat = {tuple(_int(p) for p in k.split(".")): v for k, v in model_or_state.items()}
    else:
        flat = _flat_paths(model_or_state)
    flat = _dequantized(model_or_state, flat)
    out = {p: v for p, v in flat.items() if p[-1] not in ("lora_a", "lora_b")}
    for p in [p for p in flat if p[-1] == "lora_a"]:
        base = p[:-1]
        scale = scales.get(base, lora_scale)
        if scale is None:
            raise FFTError(f"{_dotted(base)} has LoRA adapters: pass lora_scale= to fold them")
        kernel = np.asarray(out[(*base, "kernel")])
        out[(*base, "kernel")] = fold_adapter(kernel, flat[p], flat[(*base, "lora_b")], scale)
    return out


def _dequantized(model_or_state, flat: dict) -> dict:
    """`flat` with every QLoRA `kernel_q` + `kernel_scale` pair replaced by its dequantized
    `kernel`: in the layer's `param_dtype` (the base's dtype) for a module, else float32."""
    if not any(p[-1] == "kernel_q" for p in flat):
        return flat
    dtypes = {}
    if isinstance(model_or_state, nnx.Module):
        from fft.models.layers import Linear

        for path, m in nnx.iter_graph(model_or_state):
            if isinstance(m, Linear):
                dtypes[tuple(_int(p) for p in path)] = m.param_dtype
    out = dict(flat)
    for p in [p for p in flat if p[-1] == "kernel_q"]:
        q, scale = out.pop(p), out.pop((*p[:-1], "kernel_scale"))
        dtype = dtypes.get(p[:-1], np.float32)
        out[(*p[:-1], "kernel")] = quant.dequantize(np.asarray(q), np.asarray(scale), np.float32)
        out[(*p[:-1], "kernel")] = out[(*p[:-1], "kernel")].astype(dtype)
    return out


def _int(s):
    return int(s) if isinstance(s, str) and s.isdigit() else s


# Vocabulary-bearing leaves and their vocab axis (as in fft.pretrained).
_VOCAB_LEAVES = {("embed", "embedding"): 0, ("lm_head", "kernel"): -1}


def real_config(model_config):
    """`model_config` as exported: the vocabulary cut back to the tokenizer's (`unpad_vocab`)."""
    return unpad_vocab(model_config, {})[0]


def unpad_vocab(model_config, flat: dict[Path, object]):
    """(config, params) cut back to the real vocabulary, as HF and PEFT expect it.

    fft pads the vocabulary of the models it builds (`ModelConfig.with_vocab`); transformers
    loads a model with its tokenizer's vocabulary, so the padding rows (masked in fft's
    logits) are dropped from the embedding and the output layer, and `vocab_size` says so.

    Args:
      model_config: the fft config; one without `real_vocab_size` is returned as it is.
      flat: `{path tuple: array}` of the params (`lm_head.kernel` may be its LoRA `lora_b`).

    Returns:
      (config with vocab_size = real vocabulary and no padding, flat with the rows cut).
    """
    n = getattr(model_config, "real_vocab_size", 0)
    if not n:
        return model_config, flat
    out = dict(flat)
    for path, value in flat.items():
        key = path[-2:] if path[-1] != "lora_b" else (path[-2], "kernel")
        axis = _VOCAB_LEAVES.get(key)
        if axis is not None and np.shape(value)[axis] == model_config.vocab_size:
            out[path] = np.take(np.asarray(value), np.arange(n), axis=axis)
    return model_config.replace(vocab_size=n, real_vocab_size=0), out


def _lookup(flat, path: Path):
    if path in flat:
        return flat[path]
    if path[0] == "layers" and ("layers", *path[2:]) in flat:  # scan-stacked
        return flat[("layers", *path[2:])][path[1]]
    raise FFTError(f"the model has no parameter {_dotted(path)} that its config implies")


def hf_tensors(model_or_state, model_config, *, lora_scale: float | None = None):
    """Yields (canonical HF name, HF-layout numpy array) for every tensor of `model_config`.

    A padded vocabulary is cut back to the real one (`unpad_vocab`): name and size the exported
    file with `real_config(model_config)`.

    Args:
      model_or_state: as for `export_hf`; LoRA adapters are folded into their kernels.
      model_config: its ModelConfig or EncoderConfig (picks the layout table).
      lora_scale: the adapters' scale when a state/dict (not a module) carries LoRA leaves.
    """
    flat = _params_to_export(model_or_state, lora_scale)
    model_config, flat = unpad_vocab(model_config, flat)
    for entry in hf_layout.layout(model_config):
        arrays = (np.asarray(_lookup(flat, p)) for p in entry.paths)
        yield entry.hf, np.ascontiguousarray(entry.to_hf(*arrays))


def export_hf(
    model_or_state,
    model_config,
    out_dir: str,
    tokenizer=None,
    *,
    dtype=None,
    lora_scale: float | None = None,
    max_shard_bytes: int = 4 << 30,
) -> str:
    """Writes a HuggingFace model directory that `transformers` loads with identical logits.

    Args:
      model_or_state: an fft Transformer/Encoder, its param nnx.State, or a flat
        `{'layers.0.attn.q.kernel': array}` dict. LoRA adapters are folded into the kernels.
      model_config: its ModelConfig (family picks the HF class) or EncoderConfig.
      out_dir: created if needed; gets config.json, model.safetensors (or shards + index), and
        the tokenizer's files when `tokenizer` is given.
      tokenizer: optional fft Tokenizer; its bos/eos/pad ids go into config.json as well.
      dtype: storage dtype (default: the params' own).
      lora_scale: the adapters' scale when a state/dict (not a module) carries LoRA leaves.
      max_shard_bytes: split the weights over several files above this size.

    Returns:
      out_dir.
    """
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    real = real_config(model_config)  # what transformers sees: no vocabulary padding
    shards, current, size = [], {}, 0
    for name, arr in hf_tensors(model_or_state, model_config, lora_scale=lora_scale):
        if dtype is not None:
            arr = arr.astype(jnp.dtype(dtype))
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[hf_layout.hf_name(real, name)] = arr
        size += arr.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())},
                 "weight_map": weight_map}  # fmt: skip
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh, indent=1)
    hf_cfg = config_to_hf(real)
    first = next(iter(shards[0].values()))
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(first.dtype)
    if tokenizer is not None:
        for key, attr in (
            ("bos_token_id", "bos_id"),
            ("eos_token_id", "eos_id"),
            ("pad_token_id", "pad_id"),
        ):
            value = getattr(tokenizer, attr, -1)
            if value is not None and value >= 0:
                hf_cfg[key] = int(value)
        tokenizer.save(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(hf_cfg, fh, indent=1)
    return out_dir
