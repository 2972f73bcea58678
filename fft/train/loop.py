"""The one training loop every method uses.

    train(config, workdir, method=..., build_model=..., loss_fn=..., train_data=...)

reads top to bottom:  mesh and rules  ->  abstract state and shardings  ->  resume or init  ->
compile the step  ->  evaluate before  ->  steps (log, eval, checkpoint, preemption, NaN guard)
->  final checkpoint, evaluate after  ->  results.json.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
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
from fft.train import optim, preemption
from fft.train.state import TrainState, count_model_params, count_params, split_model
from fft.train.step import make_train_step

log = logging.getLogger(__name__)


def _cfg(config, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        try:
            node = node[part] if hasattr(node, "__getitem__") else getattr(node, part)
        except (KeyError, AttributeError, TypeError):
            return default
    return default if node is None else node


def _gather_data_states(local: Any) -> list:
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


def _own_data_state(saved: dict) -> Any:
    """This process's entry of a checkpoint's data states (see `_gather_data_states`).

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


def _is_main() -> bool:
    return jax.process_index() == 0


# =============================================================================================
# Workdir files written once, on the first start
# =============================================================================================


def _changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# ModelConfig fields that are runtime options or sizes fitted to the data, not the architecture
# a preset names: a loaded fft:tiny with its own vocabulary or bf16 compute is still 'tiny'.
_NOT_ARCHITECTURE = (
    "vocab_size", "real_vocab_size", "max_seq_len", "dtype", "param_dtype", "remat",
    "scan_layers", "attention", "quant", "quant_block",
)  # fmt: skip


def _preset_of(model_config) -> str | None:
    """The name of the fft.models preset whose architecture `model_config` has, else None."""
    from fft.models import presets

    def arch(mc):
        return {k: v for k, v in mc.to_dict().items() if k not in _NOT_ARCHITECTURE}

    try:
        mine = arch(model_config)
    except AttributeError:  # not a ModelConfig: nothing to name
        return None
    return next((n for n, p in presets.PRESETS.items() if arch(p) == mine), None)


def _recorded_config(config, model_config) -> dict:
    """The config as config.json records it: what was actually built, not a stale default.

    `model.preset` only chooses the architecture of a model trained from scratch; with
    `init_from` the architecture is the loaded model's, so the record names the preset that
    architecture matches (None for other models, e.g. a HF one) and `model.built` holds the
    model config actually used (model.json has the same).
    """
    to_json = getattr(config, "to_json_best_effort", None)
    record = json.loads(to_json() if to_json else json.dumps(dict(config), default=str))
    model = record.get("model")
    if model_config is not None and isinstance(model, dict):
        if record.get("init_from"):
            model["preset"] = _preset_of(model_config)
        if hasattr(model_config, "to_dict"):
            model["built"] = model_config.to_dict()
    return record


def _write_run_files(config, workdir, tokenizer, model_config):
    if not _is_main():
        return
    os.makedirs(workdir, exist_ok=True)
    text = json.dumps(_recorded_config(config, model_config), indent=2, default=str)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path) and os.path.isdir(os.path.join(workdir, "checkpoints")):
        # A restart with other settings resumes all the same (changing e.g. mixture weights or
        # steps on resume is legitimate); say what changed so an accidental change is seen.
        try:
            with open(path) as f:
                changed = _changed_settings(json.load(f), json.loads(text))
        except ValueError:  # an unreadable old config.json only loses the comparison
            changed = []
        if changed:
            print("Resuming with changed settings: " + "; ".join(changed[:10]), flush=True)
    with open(path, "w") as f:
        f.write(text)
    if model_config is not None:
        with open(os.path.join(workdir, "model.json"), "w") as f:
            json.dump(model_config.to_dict(), f, indent=2)
    tok_dir = os.path.join(workdir, "tokenizer")
    if tokenizer is not None and not os.path.isdir(tok_dir):
        os.makedirs(tok_dir, exist_ok=True)
        tokenizer.save(tok_dir)


# =============================================================================================
# Abstract state -> shardings -> init (no full-size array is ever built on one device)
# =============================================================================================


def _build_state_fns(build_model, trainable, tx, seed: int):
    def init_state() -> TrainState:
        model = build_model()
        _, params, frozen = split_model(model, trainable)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            frozen=frozen,
            opt_state=tx.init(params),
            rng=jax.random.fold_in(jax.random.key(seed), 1),
        )

    return init_state


def _apply_loaded_weights(state, graphdef, trainable, loaded, state_sh):
    """Writes `load_weights`' partial state into params/frozen, keeping the shardings."""
    model = nnx.merge(graphdef, state.params, state.frozen)
    nnx.update(model, loaded)
    _, params, frozen = split_model(model, trainable)
    params = jax.device_put(params, state_sh.params)
    frozen = jax.device_put(frozen, state_sh.frozen)
    return state.replace(params=params, frozen=frozen)


# =============================================================================================
# Starting a run: resume from the workdir's latest good checkpoint; else init + load weights
# =============================================================================================


def _resume_or_init(ckpt, init_fn, abstract_state, state_sh, train_data, load_weights, ctx):
    """Returns `(state, loop_state)`; loop_state holds counters kept across restarts."""
    # 1. Resume: the workdir has a checkpoint -> the exact TrainState and data position.
    restored = ckpt.restore_latest(sharding.with_shardings(abstract_state, state_sh))
    if restored is not None:
        state, saved, step = restored
        data = _own_data_state(saved)
        if hasattr(train_data, "set_state") and data is not None:
            train_data.set_state(data)
        log.info("resumed from step %d", step)
        print(f"Resuming from checkpoint at step {step}.", flush=True)
        return state, saved.get("loop", {})
    # 2. Fresh start: random init placed directly with its shardings ...
    state = jax.jit(init_fn, out_shardings=state_sh)()
    # 3. ... then the pretrained weights the method knows (init_from), where given.
    if load_weights is not None:
        graphdef, trainable, model_abstract, model_sh = ctx
        loaded = load_weights(model_abstract, model_sh)
        if loaded is not None:
            state = _apply_loaded_weights(state, graphdef, trainable, loaded, state_sh)
    return state, {}


# =============================================================================================
# Evaluation and accounting
# =============================================================================================


def _evaluate(evaluate, graphdef, state, writer, step, split="eval") -> dict[str, float]:
    if evaluate is None:
        return {}
    model = nnx.merge(graphdef, state.params, state.frozen)
    values = metrics_lib.to_floats(evaluate(model) or {})
    writer.write(step, values, split=split)
    return values


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


def _train_flops(tokens: int, n_total: int, n_trainable: int, model_config, seq_len) -> float:
    """6N per token for a full fine-tune (fwd 2N, bwd 4N); frozen weights skip the weight-grad
    matmuls (4N + 2N_trainable); plus attention 12 * L * H * Dh * T (PaLM appendix B)."""
    per_token = 4 * n_total + 2 * n_trainable
    layers = getattr(model_config, "n_layers", 0) or 0
    heads = getattr(model_config, "n_heads", 0) or 0
    head_dim = getattr(model_config, "head_dim", 0) or 0
    per_token += 12 * layers * heads * head_dim * int(seq_len or 0)
    return float(per_token) * tokens


# =============================================================================================
# The loop
# =============================================================================================


def train(
    config,
    workdir: str,
    *,
    method: str,
    build_model: Callable[[], nnx.Module],
    loss_fn: Callable,
    train_data: Iterator[dict],
    evaluate: Callable[[nnx.Module], dict] | None = None,
    trainable: Any = nnx.Param,
    load_weights: Callable | None = None,
    tokenizer=None,
    model_config=None,
    lr_multiplier_fn: Callable[[str], float] | None = None,
) -> dict:
    """Trains `build_model()` with `loss_fn` on `train_data`; resumable, sharded, preemptible.

    Args:
      config: ConfigDict with steps, batch_size, seq_len, seed, optim.*, mesh.*,
        sharding.rules, checkpoint_every, keep_checkpoints, eval_every, log_every.
      workdir: run directory (config.json, model.json, tokenizer/, checkpoints/,
        metrics.jsonl, tb/, results.json).
      method: method name recorded in results.json.
      build_model: `() -> nnx.Module` with random init (traced under jit / eval_shape).
      loss_fn: `(model, batch, rng) -> (loss, aux)` (see fft.train.step).
      train_data: iterator of numpy batches (this process's rows); `get_state()` /
        `set_state()` make resume exact; an optional `stats` dict is logged.
      evaluate: `model -> {metric: float}`, run before, every eval_every and after.
      trainable: nnx filter of the trainable Variables.
      load_weights: `(abstract_model_state, shardings) -> partial nnx.State`, applied on a
        fresh start (init_from).
      tokenizer: saved to workdir/tokenizer on the first start.
      model_config: its `to_dict()` goes to workdir/model.json; sizes feed the FLOP estimate.
      lr_multiplier_fn: `param path -> lr factor` (default: optim.layer_decay if not 1).

    Returns:
      The results dict (also written to workdir/results.json), or with `"preempted": True`
      when SIGTERM stopped the run after saving. A workdir already finished at `steps` returns
      its results.json unchanged; one finished at fewer steps continues, and the new record
      keeps the earlier one under `history`.
    """
    t_start = time.time()
    workdir = paths.workdir_str(workdir)  # [host] epath: a gs:// URL stays a URL
    depth = int(_cfg(config, "data.prefetch", 2))  # [host] prefetch
    train_data = prefetch_lib.maybe_prefetch(train_data, depth)  # [host] prefetch
    steps, batch_size = int(config.steps), int(config.batch_size)
    grad_accum = int(_cfg(config, "optim.grad_accum", 1))

    # ---- mesh and rules -------------------------------------------------------------------
    mesh = sharding.make_mesh(
        _cfg(config, "mesh.data", -1), _cfg(config, "mesh.fsdp", 1), _cfg(config, "mesh.tensor", 1)
    )
    rules = sharding.rules_from_config(_cfg(config, "sharding.rules", ()))
    sharding.check_batch_size(batch_size, mesh)
    if model_config is not None:
        sharding.check_model_fits(model_config, mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if grad_accum > 1 and (batch_size // grad_accum) % shards:
        raise ConfigError(
            f"batch_size={batch_size} / optim.grad_accum={grad_accum} = "
            f"{batch_size // grad_accum} rows per microbatch do not divide over mesh.data*fsdp="
            f"{shards} devices; lower grad_accum or raise batch_size."
        )

    with sharding.use_mesh(mesh, rules):
        # ---- abstract state -> shardings ------------------------------------------------------
        abstract_model = nnx.eval_shape(build_model)
        graphdef, abs_params, abs_frozen = split_model(abstract_model, trainable)
        layer_decay = float(_cfg(config, "optim.layer_decay", 1.0))
        if lr_multiplier_fn is None and layer_decay != 1.0 and model_config is not None:
            lr_multiplier_fn = optim.layerwise_lr_decay(model_config.n_layers, layer_decay)
        tx, schedule = optim.make_optimizer(config.optim, steps, abs_params, lr_multiplier_fn)
        init_fn = _build_state_fns(build_model, trainable, tx, int(_cfg(config, "seed", 0)))
        abstract_state = jax.eval_shape(init_fn)
        state_sh = sharding.state_shardings(abstract_state, mesh, rules)
        model_abstract = nnx.state(abstract_model)
        model_sh = sharding.state_shardings(model_abstract, mesh, rules)
        n_trainable = count_params(abs_params)
        n_total = count_model_params(model_abstract)

        # ---- resume or init -------------------------------------------------------------------
        ckpt = ckpt_lib.Checkpointer(
            os.path.join(workdir, "checkpoints"), keep=int(_cfg(config, "keep_checkpoints", 2))
        )
        ctx = (graphdef, trainable, model_abstract, model_sh)
        state, loop_state = _resume_or_init(
            ckpt, init_fn, abstract_state, state_sh, train_data, load_weights, ctx
        )
        start_step = int(jax.device_get(state.step))
        previous = _previous_results(workdir) if start_step > 0 else None
        if previous is not None and start_step >= steps:
            # Finished already: a rerun must not re-evaluate and overwrite the record.
            ckpt.close()
            print(
                f"run already finished at step {start_step}: results in "
                f"{os.path.join(workdir, 'results.json')}",
                flush=True,
            )
            return previous
        if start_step == 0:
            _write_run_files(config, workdir, tokenizer, model_config)
        print(
            f"[{method}] params: {n_total:,} total, {n_trainable:,} trainable; mesh "
            f"{dict(mesh.shape)}; steps {start_step}->{steps}",
            flush=True,
        )

        # ---- the compiled step ----------------------------------------------------------------
        step_fn = _with_token_counts(
            make_train_step(graphdef, loss_fn, tx, grad_accum=grad_accum, schedule=schedule)
        )
        replicated = NamedSharding(mesh, PartitionSpec())
        jitted = None  # built from the first batch's structure

        writer = metrics_lib.MetricWriter(workdir)
        before_path = os.path.join(workdir, "eval_before.json")
        # ---- evaluate before ------------------------------------------------------------------
        if start_step == 0 or not os.path.exists(before_path):
            before = _evaluate(evaluate, graphdef, state, writer, start_step, split="eval_before")
            if _is_main():
                with open(before_path, "w") as f:
                    json.dump(before, f)
        else:
            with open(before_path) as f:
                before = json.load(f)

        # ---- steps ----------------------------------------------------------------------------
        log_every = max(int(_cfg(config, "log_every", 10)), 1)
        eval_every = int(_cfg(config, "eval_every", 0))
        ckpt_every = int(_cfg(config, "checkpoint_every", 0))
        # Global counts, from the steps' metrics (the same on every process): `tokens_seen`
        # real tokens (the cost), `targets_seen` loss tokens (the `tokens` of metrics rows).
        tokens_seen = int(loop_state.get("tokens", 0))
        targets_seen = int(loop_state.get("target_tokens", 0))
        timer, bar = metrics_lib.StepTimer(), metrics_lib.ProgressBar(steps, start_step, method)
        pending = None  # (step, metrics) of the previous step: checked one step late so the
        # host never waits on the step it just dispatched
        last_train: dict[str, float] = {}
        preempted = False
        step = last_saved = start_step

        def data_state():
            data = train_data.get_state() if hasattr(train_data, "get_state") else None
            loop = {"tokens": tokens_seen, "target_tokens": targets_seen}
            return {"data_by_process": _gather_data_states(data), "loop": loop}

        def check_and_log(step_metrics, force=False):
            # Called exactly once for every step (one step late), so the counts are exact.
            nonlocal last_train, tokens_seen, targets_seen
            done, m = step_metrics
            metrics_lib.check_finite({"loss": m["loss"]}, done)
            m = dict(m)
            tokens_seen += int(m.pop("input_tokens"))
            targets_seen += int(m.pop("target_tokens"))
            if force or done % log_every == 0 or done == steps:
                extra = timer.lap()
                values = {**metrics_lib.to_floats(m), "tokens_per_s": extra["tokens_per_s"]}
                values["tokens"] = targets_seen
                values.update(getattr(train_data, "stats", None) or {})
                last_train = writer.write(done, values, split="train")
                bar.update(0, loss=values["loss"], tok_s=round(extra["tokens_per_s"]))

        try:
            check_every = int(_cfg(config, "preemption_check_every", 10))  # [host] preemption
            with preemption.PreemptionGuard(check_every) as guard:  # [host] preemption
                while step < steps:
                    if guard.should_stop(step):  # [host] preemption
                        preempted = True
                        break
                    if hasattr(train_data, "bind_state"):
                        # On-policy data (PPO/GRPO rollouts) samples from the live weights.
                        train_data.bind_state(graphdef, state)
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
                    batch = sharding.put_batch(batch_np, mesh)
                    if jitted is None:
                        batch_sh = {k: v.sharding for k, v in batch.items()}
                        jitted = jax.jit(
                            step_fn,
                            in_shardings=(state_sh, batch_sh),
                            out_shardings=(state_sh, replicated),
                            donate_argnums=0,
                        )
                    state, step_metrics = jitted(state, batch)
                    step += 1
                    timer.tick(_batch_tokens(batch_np))
                    bar.update(1)
                    if pending is not None:
                        check_and_log(pending)
                    pending = (step, step_metrics)
                    if eval_every and step % eval_every == 0 and step < steps:
                        _evaluate(evaluate, graphdef, state, writer, step)
                    if ckpt_every and step % ckpt_every == 0:
                        check_and_log(pending)  # never checkpoint a non-finite state
                        pending = None
                        ckpt.save(step, state, data_state())
                        last_saved = step
                if pending is not None:
                    check_and_log(pending, force=True)

                # ---- final checkpoint (also on SIGTERM) ---------------------------------------
                if step != last_saved:
                    ckpt.save(step, state, data_state())
                ckpt.wait()
        except BaseException:
            # NaN guard or Ctrl-C: flush what was written, let pending saves finish, re-raise.
            prefetch_lib.close(train_data)  # [host] prefetch
            bar.close()
            writer.close()
            ckpt.close()
            raise
        prefetch_lib.close(train_data)  # [host] prefetch: the worker stops before the evals
        bar.close()

        if preempted:
            ckpt.close()
            writer.close()
            print(f"Preempted: saved step {step} in {workdir}; rerun to resume.", flush=True)
            return {"method": method, "steps": step, "preempted": True}

        # ---- evaluate after -------------------------------------------------------------------
        after = _evaluate(evaluate, graphdef, state, writer, step, split="eval_after")
        ckpt.close()
        writer.close()

    # ---- results.json -------------------------------------------------------------------------
    results = {
        "method": method,
        "config": json.loads(config.to_json_best_effort())
        if hasattr(config, "to_json_best_effort")
        else dict(config),
        "before": before,
        "after": after,
        "steps": step,
        "wall_s": time.time() - t_start,
        "train_loss": last_train.get("loss"),
        "cost": {
            "tokens": tokens_seen,
            "target_tokens": targets_seen,
            "train_flops": _train_flops(
                tokens_seen, n_total, n_trainable, model_config, _cfg(config, "seq_len", 0)
            ),
            "trainable_params": n_trainable,
            "total_params": n_total,
            "peak_memory_bytes": _peak_memory_bytes(),
        },
    }
    if previous is not None:
        _keep_history(results, previous)
    if _is_main():
        path = os.path.join(workdir, "results.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(metrics_lib.format_table(before, after, saved_to=path), flush=True)
    return results


def _previous_results(workdir: str) -> dict | None:
    """The results.json of a run this one resumes (it had finished at fewer steps), or None."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # a torn file keeps no record worth keeping
        return None


def _keep_history(results: dict, previous: dict) -> None:
    """Continuing a finished run: the new record keeps the earlier one.

    `history` lists the earlier records (oldest first, each as it was written), `steps_covered`
    is the step range of this record ([0, steps]: training is cumulative) and `wall_s` sums the
    segments (as `cost.tokens` does).
    """
    earlier = {k: v for k, v in previous.items() if k != "history"}
    results["history"] = list(previous.get("history") or []) + [earlier]
    results["steps_covered"] = [0, results["steps"]]
    results["wall_s"] = results["wall_s"] + float(previous.get("wall_s") or 0.0)
