"""LoRA / frozen-base checkpoints: the frozen weights are saved once to `checkpoints/frozen`,
step checkpoints hold adapters + optimizer state only and restore exactly; a full fine-tune's
layout is unchanged. (Kill-and-resume of a LoRA run through the loop: tests/test_checkpoint.py.)
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "train"))

from toy_lm import build  # noqa: E402
from toy_run import lora_build  # noqa: E402

from fft import checkpoint as ck  # noqa: E402
from fft import pretrained, sharding  # noqa: E402
from fft.models.lora import LoRAParam  # noqa: E402
from fft.train import optim  # noqa: E402
from fft.train.state import TrainState, split_model  # noqa: E402


def _state(make_model, trainable, step, seed=0):
    _, params, frozen = split_model(make_model(), trainable)
    tx, _ = optim.make_optimizer({"name": "adamw", "lr": 0.1}, 10, params)
    params = jax.tree.map(lambda x: x + step, params)  # distinct values per step
    opt_state = jax.tree.map(lambda x: x + step if jnp.issubdtype(x.dtype, jnp.floating) else x,
                             tx.init(params))  # fmt: skip
    return TrainState(jnp.int32(step), params, frozen, opt_state, jax.random.key(seed + step))


def _bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _files(path) -> dict:
    out = {}
    for r, _, fs in os.walk(path):
        for f in fs:
            p = os.path.join(r, f)
            out[p] = os.stat(p).st_mtime_ns
    return out


def _sharded_target(state, mesh):
    abstract = jax.eval_shape(lambda: state)
    return sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh))


def _assert_same_tree(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb, strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lora_steps_are_small_frozen_saved_once_restore_exact(tmp_path):
    make = lora_build()
    states = {s: _state(make, LoRAParam, s) for s in (1, 2, 3)}
    assert ck.has_frozen_weights(states[1])
    root = tmp_path / "checkpoints"
    c = ck.Checkpointer(str(root), keep=2)
    c.save(1, states[1], {"data": 1})
    c.wait()
    frozen_files = _files(root / "frozen")
    assert frozen_files
    c.save(2, states[2], {"data": 2})
    c.save(3, states[3], {"data": 3})
    c.close()
    assert _files(root / "frozen") == frozen_files  # written once, never again
    assert sorted(d for d in os.listdir(root) if d.isdigit()) == ["2", "3"]
    assert all((root / d / "frozen_ref").exists() for d in ("2", "3"))

    # A step checkpoint holds the adapters and their Adam moments: a fraction of the base.
    step_bytes, frozen_bytes = _bytes(root / "3"), _bytes(root / "frozen")
    n_frozen = sum(x.size for x in jax.tree.leaves(states[3].frozen))
    n_params = sum(x.size for x in jax.tree.leaves(states[3].params))
    print(f"step {step_bytes} B vs frozen {frozen_bytes} B ({n_params} vs {n_frozen} weights)")
    assert n_params * 5 < n_frozen and step_bytes * 2 < frozen_bytes

    # A new process's Checkpointer (resume) restores the whole state, frozen base included,
    # bitwise, onto another mesh.
    mesh = sharding.make_mesh(data=2, fsdp=4)
    c2 = ck.Checkpointer(str(root), keep=2)
    state, data, step = c2.restore_latest(_sharded_target(states[3], mesh))
    assert step == 3 and data == {"data": 3}
    _assert_same_tree(state, states[3])
    assert state.frozen is not None and jax.tree.leaves(state.frozen)
    # ... and its next save does not rewrite the frozen weights.
    c2.save(4, jax.device_get(state), {"data": 4})
    c2.close()
    assert _files(root / "frozen") == frozen_files


def test_fresh_start_over_a_stale_frozen_copy_rewrites_it(tmp_path):
    root = tmp_path / "checkpoints"
    other = _state(lora_build(seed=1), LoRAParam, 1)  # another base
    c = ck.Checkpointer(str(root), keep=2, async_save=False)
    c._write_frozen_once(other.frozen)  # a start killed before its first step checkpoint
    c.close()
    mine = _state(lora_build(seed=0), LoRAParam, 1)
    c = ck.Checkpointer(str(root), keep=2, async_save=False)
    c.save(1, mine, {})
    c.close()
    state, _, _ = ck.Checkpointer(str(root)).restore_latest(jax.eval_shape(lambda: mine))
    _assert_same_tree(state.frozen, mine.frozen)


def test_weights_readers_find_the_frozen_base(tmp_path):
    make = lora_build()
    state = _state(make, LoRAParam, 2)
    c = ck.Checkpointer(str(tmp_path / "checkpoints"), keep=1, async_save=False)
    c.save(2, state, {})
    c.close()
    # init_from an fft LoRA workdir: adapters from the step, base weights from frozen/.
    abstract = nnx.state(nnx.eval_shape(make), nnx.Param)
    loaded = ck.load_state(str(tmp_path), abstract)
    _, params, frozen = split_model(nnx.merge(nnx.graphdef(nnx.eval_shape(make)), loaded),
                                    LoRAParam)  # fmt: skip
    _assert_same_tree(params, state.params)
    _assert_same_tree(nnx.filter_state(frozen, nnx.Param),
                      nnx.filter_state(state.frozen, nnx.Param))  # fmt: skip
    # Export's reader: the base kernels and the adapters.
    raw = pretrained.read_raw_params(str(tmp_path))
    q = state.frozen["layers"][0]["attn"]["q"]["kernel"].get_value()
    np.testing.assert_array_equal(raw["layers.0.attn.q.kernel"], np.asarray(q))
    assert "layers.0.attn.q.lora_a" in raw


def test_full_fine_tune_layout_is_unchanged(tmp_path):
    state = _state(build(), nnx.Param, 1)
    assert not ck.has_frozen_weights(state)
    root = tmp_path / "checkpoints"
    c = ck.Checkpointer(str(root), keep=1, async_save=False)
    c.save(1, state, {"data": 1})
    c.close()
    assert sorted(os.listdir(root)) == ["1"]
    items = set(os.listdir(root / "1")) - {"commit_success.txt"}  # the marker is fs-dependent
    assert items == {"_CHECKPOINT_METADATA", "data", "state"}
    restored, data, step = ck.Checkpointer(str(root)).restore_latest(jax.eval_shape(lambda: state))
    assert step == 1 and data == {"data": 1}
    _assert_same_tree(restored, state)
