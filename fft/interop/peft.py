"""LoRA adapters <-> HuggingFace PEFT adapter directories.

A PEFT LoRA adapter is `adapter_config.json` + `adapter_model.safetensors` with tensors named
`base_model.model.<hf module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`, where
`<hf module>` is the module's name in the HF model class (`model.layers.0.self_attn.q_proj`).
fft's adapters are `lora_a [in..., r]` and `lora_b [r, out...]` on a Linear, so the conversion is
a reshape and a transpose; the module names come from the same tables as full-weight export
(`hf_layout`). PEFT's scale is `lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`), as in fft.

GPT-2 fuses q/k/v into one `c_attn` module, which one rank-r adapter per projection cannot be
written as; such adapters raise FFTError (the o / MLP projections export fine).
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
from flax import nnx

from fft.config_lib import FFTError
from fft.interop import hf_layout
from fft.interop.hf import unpad_vocab

_PREFIX = "base_model.model."


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _linear_entries(model_config):
    """{fft kernel path: HF module name} for every plain linear of the family's table."""
    out = {}
    for e in hf_layout.layout(model_config):
        if e.linear:
            out[e.paths[0]] = hf_layout.hf_name(model_config, e.hf)[: -len(".weight")]
    return out


def _flat_lora(model_state) -> tuple[dict[tuple, np.ndarray], dict[tuple, float]]:
    """({(..., 'lora_a'|'lora_b'): array}, {linear path: scale}) from a module, State or dict."""
    scales = {}
    if isinstance(model_state, nnx.Module):
        from fft.models.lora import lora_modules

        for path, lin in lora_modules(model_state, ".*"):
            if hasattr(lin, "lora_a"):
                key = tuple(_int(p) for p in path.split("."))
                scales[key] = float(lin.lora_scale)
        model_state = nnx.state(model_state, nnx.Param)
    if isinstance(model_state, dict) and all(isinstance(k, str) for k in model_state):
        flat = {tuple(_int(p) for p in k.split(".")): v for k, v in model_state.items()}
    else:
        flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(model_state)}
    lora = {p: np.asarray(v) for p, v in flat.items() if p[-1] in ("lora_a", "lora_b")}
    return lora, scales


def _int(s):
    return int(s) if isinstance(s, str) and s.isdigit() else s


def export_peft(
    model_state, model_config, lora_cfg, out_dir: str, base_model_name_or_path: str = ""
) -> str:
    """Writes the LoRA adapters of an fft model as a PEFT adapter directory.

    Args:
      model_state: the fft model (with LoRA), its nnx.State, or a flat `{'a.b.lora_a': array}`.
      model_config: its ModelConfig (the family names the HF modules).
      lora_cfg: dict or ConfigDict with `rank`, `alpha` and optional `rslora`, `dropout`.
      out_dir: created if needed.
      base_model_name_or_path: recorded in adapter_config.json (PEFT loads the base from it).

    Returns:
      out_dir.

    Raises:
      FFTError: no adapters, a rank that differs from lora_cfg, or a module PEFT cannot name.
    """
    from safetensors.numpy import save_file

    lora, scales = _flat_lora(model_state)
    if not lora:
        raise FFTError("the model has no LoRA adapters to export (lora.rank=0?)")
    # PEFT applies the adapter to the HF export, whose vocabulary has no padding rows.
    model_config, lora = unpad_vocab(model_config, lora)
    rank, alpha = int(_get(lora_cfg, "rank", 0)), float(_get(lora_cfg, "alpha", 0) or 0)
    rslora = bool(_get(lora_cfg, "rslora", _get(lora_cfg, "use_rslora", False)))
    names = _linear_entries(model_config)
    tensors, targets = {}, set()
    for path in sorted((p for p in lora if p[-1] == "lora_a"), key=str):
        base = path[:-1]
        a, b = lora[path], lora[(*base, "lora_b")]
        for a_, b_, lin_path in _rows(base, a, b):
            module = _module_for(names, lin_path, model_config)
            r = a_.shape[-1]
            if rank and r != rank:
                raise FFTError(f"{'.'.join(map(str, base))}: adapter rank {r} != lora.rank={rank}")
            rank = rank or r
            tensors[f"{_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_.reshape(-1, r).T)
            tensors[f"{_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_.reshape(r, -1).T)
            targets.add(re.sub(r"^.*?\.\d+\.", "", module))  # e.g. 'self_attn.q_proj'
    if not alpha:  # recover alpha from the module's scale when the config does not give it
        scale = next(iter(scales.values()), 1.0)
        alpha = scale * (math.sqrt(rank) if rslora else rank)
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if getattr(model_config, "family", "") != "bert" else None,
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "lora_dropout": float(_get(lora_cfg, "dropout", 0.0) or 0.0),
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": getattr(model_config, "family", "") == "gpt2",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    return out_dir


def _rows(base, a, b):
    """Per-layer (a, b) pairs; scan-stacked adapters (`layers.<proj>` with a leading L) split."""
    if base[0] == "layers" and not isinstance(base[1], int):
        for i in range(a.shape[0]):
            yield a[i], b[i], ("layers", i, *base[1:], "kernel")
    else:
        yield a, b, (*base, "kernel")


def _module_for(names, kernel_path, model_config) -> str:
    """The HF module of an fft kernel path (or of a wrapper path ending in one)."""
    for k in range(len(kernel_path)):
        if kernel_path[k:] in names:
            return names[kernel_path[k:]]
    raise FFTError(
        f"LoRA on {'.'.join(map(str, kernel_path[:-1]))} has no single HF module in "
        f"{getattr(model_config, 'family', '?')} (fused or unknown); leave it out of lora.targets"
    )


def import_peft(adapter_dir: str, model, model_config=None, *, rngs: nnx.Rngs | None = None):
    """Applies a PEFT LoRA adapter onto an fft model, in place.

    Adapters are created with `fft.models.lora.apply_lora` on the layers the adapter covers when
    the model has none yet; existing adapters of the same rank are overwritten.

    Args:
      adapter_dir: holds adapter_config.json and adapter_model.safetensors.
      model: the fft model (Transformer, Encoder, or a wrapper holding one).
      model_config: defaults to `model.cfg`.
      rngs: for apply_lora's init (overwritten right after); default nnx.Rngs(0).

    Returns:
      `model`.
    """
    from safetensors.numpy import load_file

    from fft.models.lora import apply_lora, lora_modules

    with open(os.path.join(adapter_dir, "adapter_config.json")) as fh:
        config = json.load(fh)
    if config.get("peft_type", "LORA") != "LORA":
        raise FFTError(f"{adapter_dir}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise FFTError(f"{adapter_dir}: per-module rank_pattern/alpha_pattern are not supported")
    if config.get("use_dora"):
        raise FFTError(f"{adapter_dir}: DoRA adapters are not supported")
    cfg = model_config or getattr(model, "cfg", None)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    by_module = {m: p for p, m in _linear_entries(cfg).items()}
    wanted = {}  # fft linear path (dotted) -> (A, B)
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(_PREFIX)}(.+)\.lora_([AB])(?:\.\w+)?\.weight", key)
        if not m or m.group(1) not in by_module:
            raise FFTError(f"{adapter_dir}: tensor {key!r} maps to no fft linear layer")
        path = ".".join(map(str, by_module[m.group(1)][:-1]))
        wanted.setdefault(path, {})[m.group(2)] = value
    linears = dict(lora_modules(model, ".*"))

    def find(path):
        hits = [p for p in linears if p == path or p.endswith("." + path)]
        if len(hits) != 1:
            raise FFTError(f"model has {len(hits)} layers matching {path!r} (want exactly one)")
        return hits[0]

    full = {find(p): ab for p, ab in wanted.items()}
    fresh = [p for p in full if not hasattr(linears[p], "lora_a")]
    if fresh:
        regex = "^(" + "|".join(re.escape(p) for p in fresh) + ")$"
        apply_lora(model, rank, alpha, regex, rngs=rngs or nnx.Rngs(0))
    for path, ab in full.items():
        lin = linears[path]
        a_shape, b_shape = lin.lora_a[...].shape, lin.lora_b[...].shape
        if a_shape[-1] != rank:
            raise FFTError(f"{path} has rank-{a_shape[-1]} adapters; the PEFT adapter is r={rank}")
        b = ab["B"].T
        if b.shape[-1] == getattr(cfg, "real_vocab_size", -1) and b_shape[-1] == cfg.vocab_size:
            # The output layer of a padded vocabulary (unpad_vocab cut it on export).
            b = np.pad(b, ((0, 0), (0, cfg.vocab_size - b.shape[-1])))
        lin.lora_a[...] = ab["A"].T.reshape(a_shape).astype(lin.lora_a[...].dtype)
        lin.lora_b[...] = b.reshape(b_shape).astype(lin.lora_b[...].dtype)
        lin.lora_scale = float(scale)
    return model
