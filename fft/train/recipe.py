"""The method contract: every `fft.methods.<m>.recipe(config)` returns a `Recipe`.

A Recipe *describes* a run — which model, which params train, the loss, where the data and the
evals come from, which other models it needs — and does no work on devices. The one
`fft.train.trainer.Trainer` runs it: it makes the mesh, places every model sharded, owns the
global batch, resumes, evaluates, checkpoints and writes the run files. `fft.compile` and
`fft.bench` read the same Recipe without data or weights (`batch_spec`, `extra_models`).

Things that need the placed models or the run's state are factories of a `Context`
(`train_data`, `evaluate`): the Trainer calls them once, after the policy is placed and restored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Batch = dict[str, np.ndarray]
# (model, batch, rng) -> (scalar loss, aux metrics); see fft.train.step.
LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]
# model -> {metric: float}; run before training, every eval_every steps and after.
Evaluate = Callable[[nnx.Module], dict]


@runtime_checkable
class Resumable(Protocol):
    """A data source whose position is saved in every checkpoint and restored on resume."""

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@runtime_checkable
class OnPolicyData(Protocol):
    """Training data made from the live weights (PPO/GRPO rollouts): the Trainer binds the
    current train state before every pull (and never prefetches it)."""

    def bind_state(self, graphdef, state) -> None: ...

    def __next__(self) -> Batch: ...


# The train data: an iterator of this process's rows of each global batch (numpy), optionally
# Resumable and OnPolicyData, optionally with a `stats` dict logged with the train metrics.
TrainData = Iterator[Batch]


@dataclasses.dataclass(frozen=True)
class DataShard:
    """This process's part of every global batch: rows [index * rows, (index + 1) * rows)."""

    index: int
    count: int

    @classmethod
    def of_process(cls) -> DataShard:
        """The running process's shard (`jax.process_index()` of `jax.process_count()`)."""
        return cls(jax.process_index(), jax.process_count())

    def rows(self, global_batch: int) -> int:
        """Rows this process reads of a global batch (a ConfigError when it does not divide)."""
        from fft.data import pipeline

        return pipeline.rows_per_process(global_batch, self.count)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of a run, as the Trainer places it: abstract -> shardings -> init -> load.

    No full-size array is ever built on one device: `build` is traced under `jax.jit` with the
    mesh's shardings as outputs, and `load_weights` fills the placed state.
    """

    build: Callable[[], nnx.Module]  # random init; traced under eval_shape / jit
    # (abstract nnx.State, shardings) -> State of the leaves it knows; None = random init only.
    load_weights: Callable | None = None
    model_config: Any = None  # its ModelConfig: sizes for the FLOP estimate and model.json


@dataclasses.dataclass
class Context:
    """What a Recipe's factories see of the run (made by the Trainer; `fft.compile` makes none).

    Attributes:
      workdir: the run directory (a str path or URL; see fft.paths), None outside a run.
      fresh: True on a first start (no checkpoint); False when the run resumes.
      shard: this process's part of every global batch.
      mesh: the device mesh every model is placed on.
      policy: `() -> model`: the trained model with the weights it starts this segment with
        (e.g. a LoRA reference = the policy with its adapters off).
    """

    workdir: Any
    fresh: bool
    shard: DataShard
    mesh: Any = None
    policy: Callable[[], nnx.Module] | None = None  # the policy as placed/restored, pre-training
    _place: Callable[[ModelSpec], nnx.Module] | None = None
    _specs: dict[str, ModelSpec] = dataclasses.field(default_factory=dict)
    _placed: dict[str, nnx.Module] = dataclasses.field(default_factory=dict)

    def model(self, name: str) -> nnx.Module:
        """The recipe's extra model `name` (reference, reward, vocabulary source), placed
        sharded on first use and shared by every factory that asks for it."""
        if name not in self._placed:
            if name not in self._specs:
                raise KeyError(f"the recipe declares no extra model {name!r} ({list(self._specs)})")
            self._placed[name] = self._place(self._specs[name])
        return self._placed[name]

    def release(self, name: str) -> None:
        """Drops extra model `name` (e.g. once its outputs are cached) so its memory is freed."""
        self._placed.pop(name, None)


@dataclasses.dataclass
class Recipe:
    """A method's run, described; `fft.train.trainer.Trainer(...).fit(recipe, workdir)` runs it.

    Attributes:
      method: the method's name (results.json, logs).
      model: the trained model (the policy).
      loss_fn: the LossFn of the train step.
      train_data: `Context -> TrainData` (this process's rows of every global batch).
      batch_spec: `global_batch -> {field: jax.ShapeDtypeStruct}`: the fields, shapes and dtypes
        of one global batch. The Trainer checks the first real batch against it and fft.compile
        lowers the step for it without any data.
      evaluate: `Context -> Evaluate`, or None for a run without evals.
      trainable: the nnx filter of the trained Variables (the rest is frozen).
      tokenizer: saved to workdir/tokenizer on the first start.
      lr_multiplier_fn: `param path -> lr factor` (default: optim.layer_decay when not 1).
      extra_models: models beside the policy, by name, placed sharded through `Context.model`;
        fft.compile reports their per-chip bytes.
      finalize: `results -> extra results` merged into results.json before it is written once.
    """

    method: str
    model: ModelSpec
    loss_fn: LossFn
    train_data: Callable[[Context], TrainData]
    batch_spec: Callable[[int], dict[str, jax.ShapeDtypeStruct]]
    evaluate: Callable[[Context], Evaluate] | None = None
    trainable: Any = nnx.Param
    tokenizer: Any = None
    lr_multiplier_fn: Callable[[str], float] | None = None
    extra_models: dict[str, ModelSpec] = dataclasses.field(default_factory=dict)
    finalize: Callable[[dict], dict] | None = None


def token_fields(prefix: str = "", loss_mask: bool = True) -> dict[str, Any]:
    """The dtypes of one packed token sequence's fields (`prefix` for pair / candidate copies)."""
    fields = {f"{prefix}tokens": jnp.int32, f"{prefix}positions": jnp.int32,
              f"{prefix}segment_ids": jnp.int32}  # fmt: skip
    if loss_mask:
        fields[f"{prefix}loss_mask"] = jnp.float32
    return fields


def lm_batch_spec(seq_len: int, *fields: tuple[str, tuple, Any], prefixes=("",)):
    """`batch_spec` of token batches `[B, seq_len]` (one copy per prefix), plus `fields`
    given as `(name, shape after B, dtype)`."""

    def spec(batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        out = {}
        for p in prefixes:
            for name, dt in token_fields(p).items():
                out[name] = jax.ShapeDtypeStruct((batch, seq_len), dt)
        for name, shape, dt in fields:
            out[name] = jax.ShapeDtypeStruct((batch, *shape), dt)
        return out

    return spec
