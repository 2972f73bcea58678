"""TrainState and the split of an NNX model into trainable / frozen state.

The model is split once: `graphdef` (static structure), `params` (the trainable Variables, the
only part that gets gradients and optimizer state, so LoRA saves the memory it promises) and
`frozen` (everything else: frozen weights, rng state, buffers). The step merges them back
with `nnx.merge(graphdef, params, frozen)` inside the jitted function.
"""

from __future__ import annotations

import re
from typing import Any

import flax
import jax
from flax import nnx

from fft.config_lib import ConfigError

_ALL = (None, "", ".*", "all")


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes; saved whole in checkpoints.

    Attributes:
      step: int32 scalar, the number of optimizer updates applied so far.
      params: nnx.State of the trainable Variables.
      frozen: nnx.State of every other Variable (not differentiated, not updated).
      opt_state: optax state for `params` only.
      rng: base PRNG key; the step folds in `step` so every step gets fresh randomness.
    """

    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array


def param_path(path) -> str:
    """The '.'-joined name of an nnx path, e.g. ('layers', 0, 'attn', 'q', 'kernel')."""
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        if key == "value" and isinstance(p, jax.tree_util.GetAttrKey):
            continue  # the Variable's own .value node, not part of the param name
        parts.append(str(key))
    return ".".join(parts)


def trainable_filter_from_config(regex: str | None = None, lora_rank: int = 0):
    """An nnx filter for the trainable Variables.

    The rule, in full:
      * `lora_rank == 0`: every `nnx.Param` whose '.'-joined path matches `regex`
        (`re.search`; None / '' / '.*' / 'all' = every Param).
      * `lora_rank > 0`: every LoRA param (`fft.models.lora.LoRAParam`), plus the Params the
        regex names explicitly (e.g. `'lm_head|classifier'` to also train a head); with the
        default regex, only the LoRA params.
    Non-Param Variables (rng state, buffers) are never trainable.

    Args:
      regex: regular expression over paths such as `layers.3.mlp.up.kernel`.
      lora_rank: `config.lora.rank`.

    Returns:
      An nnx filter (callable `(path, variable) -> bool`).
    """
    if regex in _ALL:
        pattern = None
    else:
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise ConfigError(
                f"trainable: {regex!r} is not a valid regular expression: {e}"
            ) from None

    lora_type = None
    if lora_rank and lora_rank > 0:
        from fft.models.lora import LoRAParam  # L1; only needed with LoRA on

        lora_type = LoRAParam

    def is_trainable(path, variable) -> bool:
        if not isinstance(variable, nnx.Param):
            return False
        if lora_type is not None:
            if isinstance(variable, lora_type):
                return True
            return pattern is not None and pattern.search(param_path(path)) is not None
        return pattern is None or pattern.search(param_path(path)) is not None

    return is_trainable


def split_model(model: nnx.Module, trainable_filter=nnx.Param):
    """Splits a model into `(graphdef, params, frozen)`.

    Args:
      model: an nnx.Module (real or abstract from `nnx.eval_shape`).
      trainable_filter: nnx filter selecting the trainable Variables.

    Returns:
      `graphdef`, `params` (nnx.State, trainable), `frozen` (nnx.State, everything else).
    """
    graphdef, params, frozen = nnx.split(model, trainable_filter, ...)
    return graphdef, params, frozen


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays / ShapeDtypeStructs."""
    return int(sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, "size")))


def count_model_params(state) -> int:
    """Number of weights in the `nnx.Param` Variables of a state (rng state excluded), a
    quantized kernel (QLoRA `kernel_q` codes) counted as the weights it stands for."""
    if not isinstance(state, nnx.State):
        return count_params(state)
    from fft.models import quant  # L1; only its Variable type and code counts

    n = count_params(nnx.filter_state(state, nnx.Param))
    for path, var in nnx.to_flat_state(nnx.filter_state(state, quant.QuantWeight)):
        n += quant.logical_size(str(path[-1]), var.get_value())
    return n
