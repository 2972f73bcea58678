"""Checkpoints: orbax CheckpointManager over TrainState + the data iterator's JSON state.

Layout: `DIR/<step>/state` (the TrainState pytree, sharded arrays via OCDBT) and
`DIR/<step>/data` (JSON: the data iterator state, so a resume continues at the next example).
Saves are asynchronous; only finalised checkpoints are visible to restore (orbax writes to a
temporary directory and renames), and a checkpoint that fails to load is reported, moved aside
and the previous one is used.

A run with frozen weights (LoRA, QLoRA, a linear probe: `TrainState.frozen` holds more than rng
state) saves them once, to `DIR/frozen` (a `{"frozen": ...}` pytree, written synchronously on the
run's first save, before any step checkpoint that needs it exists), and its step checkpoints
hold `frozen=None` plus a `DIR/<step>/frozen_ref` JSON item naming that directory: the steps
carry adapters, optimizer state, step and rng only. A full fine-tune's layout is unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from fft import paths
from fft.config_lib import FFTError

log = logging.getLogger(__name__)


class CheckpointError(FFTError):
    """No usable checkpoint where one was asked for."""


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run in `directory`.

    Args:
      directory: checkpoint root (created if missing): a local path (absolute or relative)
        or a URL such as `gs://bucket/run/checkpoints`, handed to orbax unchanged.
      keep: how many checkpoints to keep (older ones are deleted after a save).
      async_save: write in a background thread (call `wait()` before reading them).
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = paths.workdir_path(directory)
        self._frozen_written = False  # this instance has written (or read) DIR/frozen
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save killed half-way
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    # -- saving ----------------------------------------------------------------------------

    def save(self, step: int, state, data_state: dict | None = None, *, force: bool = False):
        """Saves `state` (a TrainState / pytree) and the JSON-able `data_state` at `step`."""
        if step in self.all_steps():
            return False  # e.g. the final save right after a periodic one
        args = {}
        if has_frozen_weights(state):
            self._write_frozen_once(state.frozen)
            state = state.replace(frozen=None)
            args["frozen_ref"] = ocp.args.JsonSave({"path": FROZEN_DIR})
        args["state"] = ocp.args.StandardSave(state)
        args["data"] = ocp.args.JsonSave(data_state or {})
        return self._mngr.save(int(step), args=ocp.args.Composite(**args), force=force)

    @property
    def frozen_directory(self) -> epath.Path:
        """Where the frozen weights of a run with frozen weights are saved (once)."""
        return self.directory / FROZEN_DIR

    def _write_frozen_once(self, frozen) -> None:
        # Trusted only next to step checkpoints that refer to it: with no step checkpoint yet
        # (a fresh start, maybe over a start killed before its first step save) it is rewritten,
        # so a stale copy from another base can never be picked up.
        if self._frozen_written:
            return
        if not (self.all_steps() and self.frozen_directory.exists()):
            with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
                # Synchronous: the step checkpoint saved next must never exist without it.
                ckptr.save(
                    self.frozen_directory,
                    args=ocp.args.StandardSave({"frozen": frozen}),
                    force=True,
                )
            log.info("saved the frozen weights once to %s", self.frozen_directory)
        self._frozen_written = True

    def wait(self):
        """Blocks until pending asynchronous saves are on disk."""
        self._mngr.wait_until_finished()

    def close(self):
        """Waits for pending saves and releases the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    # -- restoring -------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        """Restores `(state, data_state)` at `step` into `abstract_state`'s shapes and shardings.

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct`s carrying `.sharding` (see
            `fft.sharding.with_shardings`); arrays are placed (and resharded) accordingly.
        """
        split = (self.directory / str(int(step)) / "frozen_ref").exists()
        target = abstract_state.replace(frozen=None) if split else abstract_state
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        )
        restored = self._mngr.restore(int(step), args=args)
        state = restored["state"]
        if split:
            state = state.replace(frozen=self._restore_frozen(abstract_state.frozen))
        return state, dict(restored["data"] or {})

    def _restore_frozen(self, abstract_frozen):
        """The frozen weights from `DIR/frozen`, placed as `abstract_frozen` says."""
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            tree = ckptr.restore(
                self.frozen_directory, args=ocp.args.StandardRestore({"frozen": abstract_frozen})
            )
        self._frozen_written = True  # a resumed run never rewrites it
        return tree["frozen"]

    def restore_latest(self, abstract_state) -> tuple[Any, dict, int] | None:
        """Restores the newest checkpoint that loads; None when there is none.

        A checkpoint that fails to load (truncated or corrupted files) while an older one loads
        is reported with a warning naming its step, renamed to `<step>.corrupt-<n>` (its files
        are kept, byte for byte) so that later saves of that step do not collide, and the older
        one is used. When no checkpoint loads, nothing is renamed and the run stops with a
        CheckpointError naming the directory: starting afresh over a user's checkpoints would
        silently throw their training away.

        Returns:
          `(state, data_state, step)` or None.
        """
        steps = self.all_steps()
        failed = []
        for step in reversed(steps):
            try:
                state, data = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure to load means "corrupt"
                failed.append((step, e))
                continue
            for bad, e in failed:
                why = _one_line(e, 300)
                msg = f"checkpoint at step {bad} in {self.directory} is unreadable ({why})"
                log.warning("%s; falling back to step %d.", msg, step)
                print(f"WARNING: {msg}; falling back to step {step}.", flush=True)
                self._quarantine(bad)
            return state, data, step
        if failed:
            step, e = failed[0]
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored (steps {steps}; step {step}: "
                f"{_one_line(e, 300)}). They are truncated or corrupt, or were saved with another "
                "model or optimizer config; nothing was changed. Resume with the config they were "
                "saved with, or move the directory aside to start afresh."
            )
        return None

    def _quarantine(self, step: int):
        if jax.process_index() == 0:
            src = self.directory / str(step)
            n = 0
            while (self.directory / f"{step}.corrupt-{n}").exists():
                n += 1
            if src.is_dir():
                src.rename(self.directory / f"{step}.corrupt-{n}")
        _sync(f"fft_quarantine_{step}")
        self._mngr.reload()


FROZEN_DIR = "frozen"  # DIR/frozen: the frozen weights of a LoRA / frozen-base run, saved once


def has_frozen_weights(state) -> bool:
    """True when `state` is a TrainState whose `frozen` part holds weights, not only rng state
    (then checkpoints save it once, see the module docstring)."""
    frozen = getattr(state, "frozen", None)
    if frozen is None or not hasattr(state, "replace"):
        return False
    if isinstance(frozen, nnx.State):
        frozen = nnx.filter_state(frozen, nnx.Not(nnx.RngState))
    return bool(jax.tree.leaves(frozen))


def _one_line(error: Exception, limit: int) -> str:
    """An exception's text on one line, cut to `limit` characters (for one-line errors)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:limit]


def unreadable_checkpoint(step_dir: str, error: Exception) -> CheckpointError:
    """The error for a checkpoint that orbax/tensorstore cannot read (truncated, corrupt)."""
    return CheckpointError(
        f"checkpoint {step_dir} cannot be read (truncated or corrupt?): {_one_line(error, 300)}"
    )


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# init_from an fft run: params only, resharded to the new mesh
# ---------------------------------------------------------------------------------------------


def _resolve_step_dir(path) -> epath.Path:
    """An fft workdir, its checkpoints/ dir, or one step dir -> the step dir to load."""
    path = paths.workdir_path(path)
    if (path / "state").is_dir():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.isdigit() and (child / "state").is_dir():
                steps.append(int(child.name))
    if not steps:
        raise CheckpointError(f"init_from: no fft checkpoint found under {str(path)!r}.")
    return root / str(max(steps))


def _path_key(path) -> str:
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        parts.append(str(key))
    return "/".join(parts)


def load_state(checkpoint_dir: str, abstract, shardings=None) -> nnx.State:
    """Loads model weights from an fft checkpoint into (a subset of) `abstract`.

    The checkpoint's `params` and `frozen` trees are both searched (a full fine-tune and a
    LoRA run split the same weights differently), matched by path and shape, restored straight
    into the target shardings (so a checkpoint from any mesh loads on the current one).
    Optimizer state, step and rng are not read.

    Args:
      checkpoint_dir: an fft workdir, its `checkpoints/` dir, or one step dir.
      abstract: nnx.State of ShapeDtypeStructs (e.g. `nnx.state(nnx.eval_shape(build))`).
      shardings: matching tree of shardings (default: each leaf's own `.sharding`, else
        replicated on the default device).

    Returns:
      nnx.State holding only the Variables found in the checkpoint.
    """
    step_dir = _resolve_step_dir(checkpoint_dir)
    try:
        return _load_state(step_dir, abstract, shardings)
    except FFTError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore report damage many ways
        raise unreadable_checkpoint(step_dir, e) from None


def _weight_items(step_dir) -> list:
    """The pytree items holding a step's weights: its `state`, plus `../frozen` where the run
    saved its frozen weights once (see the module docstring)."""
    items = [step_dir / "state"]
    if (step_dir / "frozen_ref").exists():
        items.append(step_dir.parent / FROZEN_DIR)
    return items


def _load_state(step_dir, abstract, shardings) -> nnx.State:
    handler = ocp.PyTreeCheckpointHandler()
    items = _weight_items(step_dir)
    with ocp.Checkpointer(handler) as ckptr:
        saved = {}
        for item, item_dir in enumerate(items):
            meta = ckptr.metadata(item_dir)
            tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
            tree = getattr(tree, "tree", tree)
            for part in ("params", "frozen"):
                for kp, m in jax.tree_util.tree_flatten_with_path(tree.get(part, {}) or {})[0]:
                    key = _path_key(kp)
                    if key.endswith("/value"):
                        key = key[: -len("/value")]
                    saved[key] = (item, part, kp, m)

        flat = list(nnx.to_flat_state(abstract))
        flat_sh = list(nnx.to_flat_state(shardings)) if shardings is not None else None
        targets: list[dict] = [{} for _ in items]
        picked = []
        for i, (path, var) in enumerate(flat):
            key = "/".join(str(p) for p in path)
            if not isinstance(var, nnx.Param):
                continue  # weights only: rng state and buffers start fresh
            value = var.get_value()
            if key not in saved or tuple(getattr(saved[key][3], "shape", ())) != value.shape:
                continue
            item, part, kp, _ = saved[key]
            sharding = flat_sh[i][1] if flat_sh is not None else getattr(value, "sharding", None)
            if isinstance(sharding, nnx.Variable):
                sharding = sharding.get_value()
            if sharding is None:
                sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            node = targets[item].setdefault(part, {})
            names = [str(getattr(k, "key", k)) for k in kp]
            for n in names[:-1]:
                node = node.setdefault(n, {})
            node[names[-1]] = ocp.ArrayRestoreArgs(
                sharding=sharding, global_shape=value.shape, dtype=value.dtype
            )
            picked.append((path, var, item, part, names))
        if not picked:
            raise CheckpointError(
                f"init_from: the checkpoint {str(step_dir)!r} holds none of the model's weights "
                "(paths or shapes differ: is it from a different model config?)."
            )
        restored = []
        for item_dir, target in zip(items, targets, strict=True):
            if not target:
                restored.append({})
                continue
            structure = jax.tree.map(lambda a: np.zeros((), a.dtype), target)  # structure only
            args = ocp.args.PyTreeRestore(item=structure, restore_args=target, partial_restore=True)
            restored.append(ckptr.restore(item_dir, args=args))
    out = []
    for path, var, item, part, names in picked:
        node = restored[item][part]
        for n in names:
            node = node[n]
        out.append((path, var.replace(value=node)))
    log.info("init_from %s: loaded %d of %d variables", step_dir, len(out), len(flat))
    return nnx.from_flat_state(out)
