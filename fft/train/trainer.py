"""The one Trainer every method runs on: `Trainer(LoopConfig.from_config(config)).fit(recipe, W)`.

`fit` reads top to bottom:  mesh and rules  ->  `prepare` (abstract state, shardings, init,
step)  ->  resume or init + load  ->  the recipe's data and evals (a `Context`)  ->  evaluate
before  ->  steps (log, eval, checkpoint, preemption, NaN guard)  ->  final checkpoint,
evaluate after  ->  results.json (with the recipe's `finalize` extras, written once).

`prepare` is the one step assembly: the loop, `fft.compile` and `fft.bench` call it, so what is
compiled ahead of time or timed is what trains.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from fft import checkpoint as ckpt_lib
from fft import metrics as metrics_lib
from fft import paths, sharding
from fft.config_lib import ConfigError
from fft.data import prefetch as prefetch_lib
from fft.train import optim, preemption, run_files
from fft.train.recipe import Context, DataShard, ModelSpec, OnPolicyData, Recipe, Resumable
from fft.train.state import TrainState, count_model_params, count_params, split_model
from fft.train.step import make_train_step

log = logging.getLogger(__name__)


def _get(config, dotted: str, default=None):
    """`config.a.b` or `default` when a part is missing (configs of older runs, test dicts)."""
    node = config
    for part in dotted.split("."):
        try:
            node = node[part] if hasattr(node, "__getitem__") else getattr(node, part)
        except (KeyError, AttributeError, TypeError):
            return default
    return default if node is None else node


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The settings the Trainer reads of a method config (typed, read once)."""

    steps: int
    batch_size: int  # the global batch (every process reads batch_size / process_count rows)
    seq_len: int = 0
    seed: int = 0
    optim: Any = None  # config.optim (fft.train.optim.make_optimizer)
    grad_accum: int = 1
    layer_decay: float = 1.0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    prefetch: int = 2  # host batches read ahead in a background thread (0: off)
    preemption_check_every: int = 10  # steps between agreements on a SIGTERM (several hosts)
    mesh: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor)
    rules: tuple = ()
    record: dict = dataclasses.field(default_factory=dict)  # the config as config.json holds it

    @classmethod
    def from_config(cls, config) -> LoopConfig:
        """The LoopConfig of a method config (ConfigDict or nested dict)."""
        to_json = getattr(config, "to_json_best_effort", None)
        record = (
            json.loads(to_json()) if to_json else json.loads(json.dumps(dict(config), default=str))
        )
        return cls(
            steps=int(config.steps if hasattr(config, "steps") else config["steps"]),
            batch_size=int(_get(config, "batch_size")),
            seq_len=int(_get(config, "seq_len", 0)),
            seed=int(_get(config, "seed", 0)),
            optim=_get(config, "optim"),
            grad_accum=int(_get(config, "optim.grad_accum", 1)),
            layer_decay=float(_get(config, "optim.layer_decay", 1.0)),
            log_every=max(int(_get(config, "log_every", 10)), 1),
            eval_every=int(_get(config, "eval_every", 0)),
            checkpoint_every=int(_get(config, "checkpoint_every", 0)),
            keep_checkpoints=int(_get(config, "keep_checkpoints", 2)),
            prefetch=int(_get(config, "data.prefetch", 2)),
            preemption_check_every=int(_get(config, "preemption_check_every", 10)),
            mesh=(
                _get(config, "mesh.data", -1),
                _get(config, "mesh.fsdp", 1),
                _get(config, "mesh.tensor", 1),
            ),  # fmt: skip
            rules=sharding.rules_from_config(_get(config, "sharding.rules", ())),
            record=record,
        )

    def make_mesh(self, devices=None):
        """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all)."""
        return sharding.make_mesh(*self.mesh, devices=devices)


# =============================================================================================
# The one step assembly
# =============================================================================================


@dataclasses.dataclass
class Prepared:
    """A recipe's train step assembled for a mesh (no array allocated yet).

    Attributes:
      graphdef: the model's static structure.
      abstract_state: the TrainState as ShapeDtypeStructs carrying their shardings.
      state_sh: NamedShardings of the TrainState.
      init_fn: `() -> TrainState`, random init; run as `jax.jit(init_fn, out_shardings=...)`.
      step_fn: `(state, batch) -> (state, metrics)` with the global batch's token counts.
      model_abstract / model_sh: the model's abstract nnx.State and its shardings (weights load).
    """

    mesh: Any
    rules: tuple
    graphdef: Any
    abstract_state: Any
    state_sh: Any
    init_fn: Any
    step_fn: Any
    model_abstract: Any
    model_sh: Any
    n_trainable: int
    n_total: int

    def jit(self, batch_sh: dict):
        """The step jitted for batches sharded as `batch_sh`, the state donated."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(
            self.step_fn,
            in_shardings=(self.state_sh, batch_sh),
            out_shardings=(self.state_sh, replicated),
            donate_argnums=0,
        )

    def global_batch_spec(self, spec: dict[str, jax.ShapeDtypeStruct]) -> dict:
        """`spec` (a recipe's batch_spec) with the batch sharding of this mesh attached."""
        return {
            k: jax.ShapeDtypeStruct(
                v.shape, v.dtype, sharding=sharding.batch_sharding(self.mesh, v.ndim)
            )
            for k, v in spec.items()
        }

    def lower(self, spec: dict[str, jax.ShapeDtypeStruct]):
        """The step lowered for a global batch of `spec` (AOT: fft.compile, fft.bench)."""
        batch = self.global_batch_spec(spec)
        jitted = self.jit({k: v.sharding for k, v in batch.items()})
        return jitted.lower(self.abstract_state, batch)


def prepare(recipe: Recipe, loop: LoopConfig, mesh, rules=None) -> Prepared:
    """Assembles `recipe`'s train step on `mesh`: call under `sharding.use_mesh(mesh, rules)`.

    Raises:
      ConfigError: the batch does not divide over the mesh (or its microbatches do not).
    """
    rules = loop.rules if rules is None else rules
    sharding.check_batch_size(loop.batch_size, mesh)
    if recipe.model.model_config is not None:
        sharding.check_model_fits(recipe.model.model_config, mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if loop.grad_accum > 1 and (loop.batch_size // loop.grad_accum) % shards:
        raise ConfigError(
            f"batch_size={loop.batch_size} / optim.grad_accum={loop.grad_accum} = "
            f"{loop.batch_size // loop.grad_accum} rows per microbatch do not divide over "
            f"mesh.data*fsdp={shards} devices; lower grad_accum or raise batch_size."
        )
    build, trainable = recipe.model.build, recipe.trainable
    abstract_model = nnx.eval_shape(build)
    graphdef, abs_params, _ = split_model(abstract_model, trainable)
    lr_fn = recipe.lr_multiplier_fn
    mc = recipe.model.model_config
    if lr_fn is None and loop.layer_decay != 1.0 and mc is not None:
        lr_fn = optim.layerwise_lr_decay(mc.n_layers, loop.layer_decay)
    tx, schedule = optim.make_optimizer(loop.optim, loop.steps, abs_params, lr_fn)

    def init_fn() -> TrainState:
        _, params, frozen = split_model(build(), trainable)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            frozen=frozen,
            opt_state=tx.init(params),
            rng=jax.random.fold_in(jax.random.key(loop.seed), 1),
        )

    abstract_state = jax.eval_shape(init_fn)
    state_sh = sharding.state_shardings(abstract_state, mesh, rules)
    model_abstract = nnx.state(abstract_model)
    step = make_train_step(
        graphdef, recipe.loss_fn, tx, grad_accum=loop.grad_accum, schedule=schedule
    )
    return Prepared(
        mesh=mesh,
        rules=rules,
        graphdef=graphdef,
        abstract_state=sharding.with_shardings(abstract_state, state_sh),
        state_sh=state_sh,
        init_fn=init_fn,
        step_fn=_with_token_counts(step),
        model_abstract=model_abstract,
        model_sh=sharding.state_shardings(model_abstract, mesh, rules),
        n_trainable=count_params(abs_params),
        n_total=count_model_params(model_abstract),
    )


def place_model(spec: ModelSpec, mesh, rules=None) -> nnx.Module:
    """`spec`'s model on `mesh`: abstract -> shardings -> jitted init -> weights loaded.

    Reference, reward and vocabulary-source models go through this path as the policy does, so
    an 8B reference is sharded like the policy, never built whole on one device.
    """
    with sharding.use_mesh(mesh, rules):
        abstract = nnx.eval_shape(spec.build)
        graphdef, abs_state = nnx.split(abstract)
        shardings = sharding.state_shardings(abs_state, mesh, rules)
        state = jax.jit(lambda: nnx.split(spec.build())[1], out_shardings=shardings)()
        model = nnx.merge(graphdef, state)
        if spec.load_weights is not None:
            loaded = spec.load_weights(abs_state, shardings)
            if loaded is not None:
                nnx.update(model, loaded)
                _, state = nnx.split(model)
                model = nnx.merge(graphdef, jax.device_put(state, shardings))
    return model


def check_batch(batch: dict, spec: dict[str, jax.ShapeDtypeStruct], method: str) -> None:
    """Raises ValueError when a global batch's fields, shapes or dtypes are not the recipe's
    `batch_spec` (what fft.compile compiles must be what trains)."""
    got = {k: (tuple(v.shape), jnp.dtype(v.dtype)) for k, v in batch.items()}
    want = {k: (tuple(v.shape), jnp.dtype(v.dtype)) for k, v in spec.items()}
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        detail = "; ".join(f"{k}: batch {got.get(k)} vs spec {want.get(k)}" for k in diff)
        raise ValueError(
            f"[{method}] the train batch does not match the recipe's batch_spec: {detail}"
        )


# =============================================================================================
# Accounting
# =============================================================================================


def _is_field(key: str, name: str) -> bool:
    return key == name or key.endswith("_" + name)


def _token_counts(batch) -> dict[str, jax.Array]:
    """Token counts of the global batch, computed inside the step (so over every process).

    `input_tokens`: real (non-padding) tokens of every sequence field (`segment_ids`,
    `chosen_segment_ids`, `cand_segment_ids`, ...); `target_tokens`: the tokens a loss is on
    (`loss_mask` and its pair / candidate copies), or one per row for a batch with `labels`
    (classification: the label is the target).
    """
    rows = next(iter(batch.values())).shape[0]
    seg = [v for k, v in batch.items() if _is_field(k, "segment_ids")]
    masks = [v for k, v in batch.items() if _is_field(k, "loss_mask")]
    inputs = sum(jnp.sum(s > 0) for s in seg) if seg else jnp.asarray(rows)
    if "labels" in batch or not masks:
        target = jnp.asarray(rows)
    else:
        target = sum(jnp.sum(m > 0) for m in masks)
    return {"input_tokens": inputs.astype(jnp.int32), "target_tokens": target.astype(jnp.int32)}


def _with_token_counts(step_fn):
    """The train step, with the global batch's `_token_counts` added to its metrics."""

    def step(state, batch):
        state, metrics = step_fn(state, batch)
        return state, {**metrics, **_token_counts(batch)}

    return step


def _batch_tokens(batch) -> int:
    if "segment_ids" in batch:
        return int((batch["segment_ids"] > 0).sum()) * jax.process_count()
    if "tokens" in batch:
        return int(batch["tokens"].size) * jax.process_count()
    return int(len(next(iter(batch.values())))) * jax.process_count()


def _peak_memory_bytes() -> int:
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports memory stats
        stats = {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # CPU: host RSS


def train_flops(tokens: int, n_total: int, n_trainable: int, model_config, seq_len) -> float:
    """6N per token for a full fine-tune (fwd 2N, bwd 4N); frozen weights skip the weight-grad
    matmuls (4N + 2N_trainable); plus attention 12 * L * H * Dh * T (PaLM appendix B)."""
    per_token = 4 * n_total + 2 * n_trainable
    layers = getattr(model_config, "n_layers", 0) or 0
    heads = getattr(model_config, "n_heads", 0) or 0
    head_dim = getattr(model_config, "head_dim", 0) or 0
    per_token += 12 * layers * heads * head_dim * int(seq_len or 0)
    return float(per_token) * tokens


# =============================================================================================
# Data positions in checkpoints
# =============================================================================================


def gather_data_states(local: Any) -> list:
    """Every process's data-iterator state, in process order (each host reads its own rows,
    so each has its own position; the checkpoint's JSON is written by the primary host only)."""
    if jax.process_count() == 1:
        return [local]
    raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    rows = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(r[: int(n)]).decode())
        for r, n in zip(rows, lengths.reshape(-1), strict=True)
    ]


def own_data_state(saved: dict) -> Any:
    """This process's entry of a checkpoint's data states (see `gather_data_states`).

    A run resumed on another number of processes can continue only when every saved entry is
    the same (a position in the global stream, e.g. a step count); per-host positions cannot be
    re-split, and that is an error naming the fix.
    """
    if "data_by_process" not in saved:
        return saved.get("data")  # checkpoints written before per-process states
    states = saved["data_by_process"]
    if len(states) == jax.process_count():
        return states[jax.process_index()]
    if all(s == states[0] for s in states):
        return states[0]
    raise ConfigError(
        f"the checkpoint holds the data positions of {len(states)} processes, which differ, "
        f"but this run has {jax.process_count()}: resume with the same number of hosts, or "
        "start a new workdir with --config.init_from=<this workdir> (weights only)."
    )


# =============================================================================================
# The Trainer
# =============================================================================================


class Trainer:
    """Runs Recipes: resumable, sharded over every process, preemptible; see the module doc."""

    def __init__(self, loop: LoopConfig):
        self.loop = loop

    def _start(self, prep: Prepared, recipe: Recipe, ckpt) -> tuple[TrainState, dict, Any]:
        """`(state, loop counters, saved data position or None)`: the workdir's latest good
        checkpoint, else a sharded random init with the recipe's weights loaded."""
        restored = ckpt.restore_latest(prep.abstract_state)
        if restored is not None:
            state, saved, step = restored
            log.info("resumed from step %d", step)
            print(f"Resuming from checkpoint at step {step}.", flush=True)
            return state, saved.get("loop", {}), own_data_state(saved)
        state = jax.jit(prep.init_fn, out_shardings=prep.state_sh)()
        load = recipe.model.load_weights
        if load is not None:
            loaded = load(prep.model_abstract, prep.model_sh)
            if loaded is not None:
                model = nnx.merge(prep.graphdef, state.params, state.frozen)
                nnx.update(model, loaded)
                _, params, frozen = split_model(model, recipe.trainable)
                state = state.replace(
                    params=jax.device_put(params, prep.state_sh.params),
                    frozen=jax.device_put(frozen, prep.state_sh.frozen),
                )
        return state, {}, None

    def fit(self, recipe: Recipe, workdir) -> dict:
        """Trains `recipe` in `workdir`; returns the results dict (also results.json).

        A run stopped by SIGTERM saves and returns `{"preempted": True, ...}`; a workdir
        finished at `steps` returns its results.json unchanged; one finished at fewer steps
        continues, and the new record keeps the earlier one under `history`.
        """
        loop, method = self.loop, recipe.method
        t_start = time.time()
        workdir = paths.workdir_str(workdir)  # a gs:// URL stays a URL
        mesh = loop.make_mesh()
        with sharding.use_mesh(mesh, loop.rules):
            prep = prepare(recipe, loop, mesh)
            ckpt = ckpt_lib.Checkpointer(
                os.path.join(workdir, "checkpoints"), keep=loop.keep_checkpoints
            )
            state, counters, data_position = self._start(prep, recipe, ckpt)
            start_step = int(jax.device_get(state.step))
            previous = run_files.previous_results(workdir) if start_step > 0 else None
            if previous is not None and start_step >= loop.steps:
                ckpt.close()  # finished already: never re-evaluate and overwrite the record
                print(f"run already finished at step {start_step}: results in "
                      f"{os.path.join(workdir, 'results.json')}", flush=True)  # fmt: skip
                return previous
            fresh = start_step == 0
            if fresh:
                mc = recipe.model.model_config
                record = run_files.recorded_config(loop.record, mc)
                run_files.write_run_files(record, workdir, recipe.tokenizer, mc)
            print(
                f"[{method}] params: {prep.n_total:,} total, {prep.n_trainable:,} trainable; "
                f"mesh {dict(mesh.shape)}; steps {start_step}->{loop.steps}",
                flush=True,
            )

            ctx = Context(
                workdir=workdir,
                fresh=fresh,
                shard=DataShard.of_process(),
                mesh=mesh,
                policy=lambda: nnx.merge(prep.graphdef, state.params, state.frozen),
                _place=lambda spec: place_model(spec, mesh, loop.rules),
                _specs=dict(recipe.extra_models),
            )
            train_data = recipe.train_data(ctx)
            if data_position is not None and isinstance(train_data, Resumable):
                train_data.set_state(data_position)
            # Off-policy data is read ahead in a thread (never rollouts: they need the live
            # weights); the saved position stays that of the consumed batches.
            train_data = prefetch_lib.maybe_prefetch(train_data, loop.prefetch)
            evaluate = recipe.evaluate(ctx) if recipe.evaluate is not None else None
            return self._run(
                recipe, prep, ckpt, state, counters, train_data, evaluate, workdir, previous,
                t_start,
            )  # fmt: skip

    def _evaluate(self, evaluate, prep, state, writer, step, split="eval") -> dict[str, float]:
        if evaluate is None:
            return {}
        model = nnx.merge(prep.graphdef, state.params, state.frozen)
        values = metrics_lib.to_floats(evaluate(model) or {})
        writer.write(step, values, split=split)
        return values

    def _run(self, recipe, prep, ckpt, state, counters, train_data, evaluate, workdir, previous,
             t_start) -> dict:  # fmt: skip
        loop, method, steps = self.loop, recipe.method, self.loop.steps
        start_step = int(jax.device_get(state.step))
        jitted = None  # built from the first batch's shardings
        on_policy = isinstance(train_data, OnPolicyData)
        writer = metrics_lib.MetricWriter(workdir)

        # ---- evaluate before (measured once, on the first start; kept in the checkpoints) ----
        before = counters.get("before")
        if before is None:
            before = self._evaluate(evaluate, prep, state, writer, start_step, "eval_before")

        # Global counts, from the steps' metrics (the same on every process): `tokens_seen`
        # real tokens (the cost), `targets_seen` loss tokens (the `tokens` of metrics rows).
        tokens_seen = int(counters.get("tokens", 0))
        targets_seen = int(counters.get("target_tokens", 0))
        timer, bar = metrics_lib.StepTimer(), metrics_lib.ProgressBar(steps, start_step, method)
        pending = None  # (step, metrics) of the previous step: checked one step late so the
        # host never waits on the step it just dispatched
        last_train: dict[str, float] = {}
        preempted = False
        step = last_saved = start_step

        def data_state():
            data = train_data.get_state() if isinstance(train_data, Resumable) else None
            kept = {"tokens": tokens_seen, "target_tokens": targets_seen, "before": before}
            return {"data_by_process": gather_data_states(data), "loop": kept}

        def check_and_log(step_metrics, force=False):
            # Called exactly once for every step (one step late), so the counts are exact.
            nonlocal last_train, tokens_seen, targets_seen
            done, m = step_metrics
            metrics_lib.check_finite({"loss": m["loss"]}, done)
            m = dict(m)
            tokens_seen += int(m.pop("input_tokens"))
            targets_seen += int(m.pop("target_tokens"))
            if force or done % loop.log_every == 0 or done == steps:
                extra = timer.lap()
                values = {**metrics_lib.to_floats(m), "tokens_per_s": extra["tokens_per_s"]}
                values["tokens"] = targets_seen
                values.update(getattr(train_data, "stats", None) or {})
                last_train = writer.write(done, values, split="train")
                bar.update(0, loss=values["loss"], tok_s=round(extra["tokens_per_s"]))

        try:
            with preemption.PreemptionGuard(loop.preemption_check_every) as guard:
                while step < steps:
                    if guard.should_stop(step):
                        preempted = True
                        break
                    if on_policy:  # rollouts sample from the live weights
                        train_data.bind_state(prep.graphdef, state)
                    try:
                        batch_np = next(train_data)
                    except StopIteration:
                        if jax.process_count() > 1:
                            # The others would wait in the next step's collectives forever.
                            raise ConfigError(
                                f"the training data ran out on process {jax.process_index()} "
                                f"at step {step} of {steps}: with several processes the train "
                                "stream must be endless (num_epochs=None, as every method's is)."
                            ) from None
                        log.warning("train_data ran out at step %d of %d", step, steps)
                        print(f"WARNING: train_data ran out at step {step} of {steps}.", flush=True)
                        break
                    batch = sharding.put_batch(batch_np, prep.mesh)
                    if jitted is None:
                        check_batch(batch, recipe.batch_spec(loop.batch_size), method)
                        jitted = prep.jit({k: v.sharding for k, v in batch.items()})
                    state, step_metrics = jitted(state, batch)
                    step += 1
                    timer.tick(_batch_tokens(batch_np))
                    bar.update(1)
                    if pending is not None:
                        check_and_log(pending)
                    pending = (step, step_metrics)
                    if loop.eval_every and step % loop.eval_every == 0 and step < steps:
                        self._evaluate(evaluate, prep, state, writer, step)
                    if loop.checkpoint_every and step % loop.checkpoint_every == 0:
                        check_and_log(pending)  # never checkpoint a non-finite state
                        pending = None
                        ckpt.save(step, state, data_state())
                        last_saved = step
                if pending is not None:
                    check_and_log(pending, force=True)
                if step != last_saved:  # final checkpoint (also on SIGTERM)
                    ckpt.save(step, state, data_state())
                ckpt.wait()
        except BaseException:
            # NaN guard or Ctrl-C: flush what was written, let pending saves finish, re-raise.
            prefetch_lib.close(train_data)
            bar.close()
            writer.close()
            ckpt.close()
            raise
        prefetch_lib.close(train_data)  # the worker stops before the evals
        bar.close()

        if preempted:
            ckpt.close()
            writer.close()
            print(f"Preempted: saved step {step} in {workdir}; rerun to resume.", flush=True)
            return {"method": method, "steps": step, "preempted": True}

        after = self._evaluate(evaluate, prep, state, writer, step, split="eval_after")
        ckpt.close()
        writer.close()

        mc = recipe.model.model_config
        results = {
            "method": method,
            "config": loop.record,
            "before": before,
            "after": after,
            "steps": step,
            "wall_s": time.time() - t_start,
            "train_loss": last_train.get("loss"),
            "cost": {
                "tokens": tokens_seen,
                "target_tokens": targets_seen,
                "train_flops": train_flops(
                    tokens_seen, prep.n_total, prep.n_trainable, mc, loop.seq_len
                ),  # fmt: skip
                "trainable_params": prep.n_trainable,
                "total_params": prep.n_total,
                "peak_memory_bytes": _peak_memory_bytes(),
            },
        }
        if recipe.finalize is not None:
            results.update(recipe.finalize(results) or {})
        if previous is not None:
            run_files.keep_history(results, previous)
        path = run_files.write_json(workdir, "results.json", results)
        if jax.process_index() == 0:
            print(metrics_lib.format_table(before, after, saved_to=path), flush=True)
        return results


def fit(config, workdir, recipe: Recipe) -> dict:
    """`Trainer(LoopConfig.from_config(config)).fit(recipe, workdir)`."""
    return Trainer(LoopConfig.from_config(config)).fit(recipe, workdir)
