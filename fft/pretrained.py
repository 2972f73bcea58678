"""Where a run's starting weights come from: an fft workdir/checkpoint or a local HF directory.

`load_spec(path)` reads the architecture and tokenizer and returns a `load_weights` function
that the train loop calls with the new model's abstract state and shardings. Loading is partial
by design: leaves the source does not have (a new classification head, fresh LoRA adapters,
rows of an extended vocabulary) keep their fresh initialisation.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from fft import tokenizers
from fft.config_lib import FFTError
from fft.models.config import ModelConfig
from fft.models.encoder import EncoderConfig


@dataclasses.dataclass
class Spec:
    """What a source provides: architecture, tokenizer, and a partial weight loader."""

    model_config: ModelConfig
    tokenizer: tokenizers.Tokenizer
    load_weights: Callable | None
    kind: str  # 'fft' | 'hf'


def kind_of(path: str) -> str:
    """'fft' for an fft workdir / checkpoint dir, 'hf' for a HuggingFace model dir."""
    if os.path.exists(os.path.join(path, "model.json")):
        return "fft"
    if os.path.exists(os.path.join(path, "config.json")) and (
        glob.glob(os.path.join(path, "*.safetensors")) or glob.glob(os.path.join(path, "*.bin"))
    ):
        return "hf"
    raise FFTError(
        f"{path} is neither an fft workdir (model.json + checkpoints/) nor a HuggingFace model "
        "directory (config.json + *.safetensors)."
    )


def load_spec(path: str) -> Spec:
    """Reads architecture + tokenizer of `path`; weights are read later by `load_weights`."""
    kind = kind_of(path)
    if kind == "hf":
        from fft.interop import hf

        spec = Spec(*hf.load_spec(path), kind="hf")
        tokenizers.check_fits(
            spec.tokenizer,
            spec.model_config.vocab_size,
            tokenizer_name=path,
            model_name=os.path.join(path, "config.json"),
        )
        return spec
    with open(os.path.join(path, "model.json")) as f:
        raw = json.load(f)
    model_config = (
        EncoderConfig.from_dict(raw) if raw.get("family") == "bert" else ModelConfig.from_dict(raw)
    )
    tokenizer = tokenizers.load_tokenizer(os.path.join(path, "tokenizer"))
    tokenizers.check_fits(
        tokenizer,
        model_config.vocab_size,
        tokenizer_name=os.path.join(path, "tokenizer"),
        model_name=os.path.join(path, "model.json"),
    )

    def load_weights(abstract_state, shardings=None):
        return place(read_fft_params(path), abstract_state, shardings)

    return Spec(model_config, tokenizer, load_weights, kind="fft")


def _path_str(path) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def latest_checkpoint(workdir: str) -> str:
    """The newest complete checkpoint item dir under `workdir/checkpoints` (or workdir itself)."""
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


def read_fft_params(workdir: str) -> dict[str, np.ndarray]:
    """{'layers.0.attn.q.kernel': array, ...} from an fft workdir's latest checkpoint.

    Trainable and frozen parts are merged, and LoRA adapters are folded into their kernels
    (kernel += a @ b * scale) so the result is a plain set of base weights.
    """
    return fold_lora(read_raw_params(workdir), _lora_scale(workdir))


def read_raw_params(workdir: str) -> dict[str, np.ndarray]:
    """Like `read_fft_params`, but LoRA adapters are kept as `X.lora_a` / `X.lora_b`."""
    item = os.path.abspath(latest_checkpoint(workdir))
    try:
        return _read_raw_item(item)
    except Exception as e:  # noqa: BLE001 - a truncated checkpoint: one error naming it
        from fft import checkpoint  # deferred: orbax is slow to import

        raise checkpoint.unreadable_checkpoint(os.path.dirname(item), e) from None


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


def fold_lora(flat: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Merges `X.lora_a`/`X.lora_b` pairs into `X.kernel` and drops them."""
    out = dict(flat)
    for name in [n for n in flat if n.endswith(".lora_a")]:
        prefix = name[: -len(".lora_a")]
        a, b = out.pop(name), out.pop(prefix + ".lora_b")
        kernel = out[prefix + ".kernel"]
        out[prefix + ".kernel"] = (kernel + np.tensordot(a, b, axes=1) * scale).astype(kernel.dtype)
    return out


def place(flat: dict[str, np.ndarray], abstract_state, shardings=None):
    """An nnx.State with the leaves of `abstract_state` found in `flat`, placed on devices.

    Leaves missing from `flat`, or with another shape, are left out (the caller keeps their
    fresh init); each array goes straight into its sharding, one tensor at a time.
    """
    shard_flat = {}
    if shardings is not None:
        for path, s in jax.tree_util.tree_leaves_with_path(shardings):
            shard_flat[_path_str(path)] = s

    leaves = {}
    for path, var in nnx.to_flat_state(abstract_state):
        name = ".".join(str(p) for p in path)
        # A backbone saved on its own fills the same leaves nested in a wrapper
        # ('backbone.layers.0…' <- 'layers.0…'): try the name, then shorter suffixes.
        parts = name.split(".")
        src = next(
            (flat[k] for k in (".".join(parts[i:]) for i in range(len(parts))) if k in flat), None
        )
        shape = tuple(var.value.shape) if hasattr(var, "value") else tuple(var.shape)
        if src is None or tuple(src.shape) != shape:
            continue
        dtype = var.value.dtype if hasattr(var, "value") else var.dtype
        arr = src.astype(dtype)
        sharding = shard_flat.get(name) or shard_flat.get(name + ".value")
        if sharding is not None:
            arr = jax.make_array_from_callback(shape, sharding, lambda idx, a=arr: a[idx])
        else:
            arr = jax.numpy.asarray(arr)
        leaves[path] = var.replace(arr) if hasattr(var, "replace") else arr
    return nnx.from_flat_state(leaves)
