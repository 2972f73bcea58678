"""Checkpoints: exact resume after SIGKILL, SIGTERM saves then exits, corrupt-latest fallback,
init_from loading resharded onto another mesh."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "train"))

from toy_lm import build  # noqa: E402
from toy_run import lora_build  # noqa: E402

from fft import checkpoint as ck  # noqa: E402
from fft import sharding  # noqa: E402
from fft.train import optim  # noqa: E402
from fft.train.state import TrainState, split_model  # noqa: E402

RUN = os.path.join(HERE, "train", "toy_run.py")


def _start(workdir, steps, block_at=None, lora=False):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), JAX_PLATFORMS="cpu")
    env["TOY_LORA"] = "1" if lora else "0"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    args = [sys.executable, RUN, str(workdir), str(steps)]
    if block_at is not None:
        args.append(str(block_at))
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def _wait_for(proc, text, timeout=240):
    deadline, seen = time.time() + timeout, []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
        assert time.time() < deadline, "".join(seen)
    raise AssertionError(f"process ended before {text!r}:\n{''.join(seen)}")


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _batches(workdir):
    with open(os.path.join(workdir, "batches.txt")) as f:
        return [tuple(line.split()) for line in f]


def _final_params(workdir, lora=False):
    abstract = nnx.state(nnx.eval_shape(lora_build() if lora else build()))
    return jax.device_get(ck.load_state(workdir, abstract))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, lora):
    full, killed = tmp_path / "full", tmp_path / "killed"
    p_full = _start(full, 20, lora=lora)
    p_kill = _start(killed, 20, block_at=13, lora=lora)
    _wait_for(p_kill, "BLOCKED 13")
    os.kill(p_kill.pid, signal.SIGKILL)
    p_kill.wait(timeout=60)
    assert p_kill.returncode == -signal.SIGKILL
    out = _finish(_start(killed, 20, lora=lora))
    _finish(p_full)
    assert "Resuming from checkpoint at step" in out
    resumed_at = int(out.split("Resuming from checkpoint at step ")[1].split(".")[0])
    assert resumed_at in (5, 10)

    # Past the last step, the prefetch thread may have read a few batches that never trained.
    full_batches = [b for b in _batches(full) if int(b[0]) < 20]
    killed_batches = [b for b in _batches(killed) if int(b[0]) < 20]
    assert [int(i) for i, _ in full_batches] == list(range(20))
    # the restarted process continues at exactly the batch after its checkpoint
    restart = next(i for i in range(1, len(killed_batches))
                   if int(killed_batches[i][0]) <= int(killed_batches[i - 1][0]))  # fmt: skip
    assert killed_batches[restart:] == full_batches[resumed_at:]
    assert killed_batches[:restart] == full_batches[:restart]

    # Every weight, the frozen base included (read back from checkpoints/frozen with LoRA).
    a, b = _final_params(full, lora), _final_params(killed, lora)
    want = nnx.state(nnx.eval_shape(lora_build() if lora else build()), nnx.Param)
    assert len(jax.tree.leaves(a)) == len(jax.tree.leaves(want))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    for run in (full, killed):
        steps = [d for d in os.listdir(run / "checkpoints") if d.isdigit()]
        assert (run / "checkpoints" / "frozen").is_dir() == lora
        assert all((run / "checkpoints" / d / "frozen_ref").exists() == lora for d in steps)


def test_sigterm_saves_then_exits_and_resumes(tmp_path):
    proc = _start(tmp_path, 20, block_at=7)
    _wait_for(proc, "BLOCKED 7")
    proc.send_signal(signal.SIGTERM)
    (tmp_path / "release").touch()
    out = _finish(proc)
    assert "DONE True" in out and "Preempted: saved step " in out
    # The batches are prefetched in a thread (the one blocked at batch 7), so the main thread
    # stops at the first step after the signal: at most the 8 steps of the batches before it.
    saved = int(out.split("Preempted: saved step ")[1].split()[0])
    assert 1 <= saved <= 8
    assert max(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == saved
    assert not (tmp_path / "results.json").exists()

    out = _finish(_start(tmp_path, 20))
    assert f"Resuming from checkpoint at step {saved}." in out and "DONE False" in out
    indices = [int(i) for i, _ in _batches(tmp_path)]
    restart = next(i for i in range(1, len(indices)) if indices[i] <= indices[i - 1])
    # The restarted run reads exactly the batches after the saved (consumed) position (and,
    # past step 20, the few its prefetch read ahead before it stopped).
    after = indices[restart:]
    assert after == list(range(saved, saved + len(after))) and len(after) >= 20 - saved


def _toy_state(step):
    graphdef, params, frozen = split_model(build()(), nnx.Param)
    tx, _ = optim.make_optimizer({"name": "adamw", "lr": 0.1}, 10, params)
    params = jax.tree.map(lambda x: x + step, params)
    return TrainState(jnp.int32(step), params, frozen, tx.init(params), jax.random.key(step))


def test_corrupt_latest_falls_back_to_previous(tmp_path, capsys):
    c = ck.Checkpointer(str(tmp_path), keep=3)
    for step in (1, 2):
        c.save(step, _toy_state(step), {"data": {"index": step}})
    c.wait()
    # truncate every array file of the newest checkpoint
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for name in files:
            if "ocdbt.process" in root or os.sep + "d" in root:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(3)
    abstract = jax.eval_shape(lambda: _toy_state(0))
    mesh = sharding.make_mesh(data=8)
    target = sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh))
    state, data, step = c.restore_latest(target)
    c.close()
    assert step == 1 and data == {"data": {"index": 1}} and int(state.step) == 1
    assert "checkpoint at step 2" in capsys.readouterr().out
    assert "1" in os.listdir(tmp_path) and "2" not in os.listdir(tmp_path)


def test_load_state_reshards_params_only(tmp_path):
    mesh8 = sharding.make_mesh(data=8)
    state = _toy_state(3)
    sh = sharding.state_shardings(jax.eval_shape(lambda: state), mesh8)
    c = ck.Checkpointer(str(tmp_path / "checkpoints"), keep=1, async_save=False)
    c.save(3, jax.device_put(state, sh), {})
    c.close()
    abstract = nnx.state(nnx.eval_shape(build(seed=1)))
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    loaded = ck.load_state(str(tmp_path), abstract, sharding.state_shardings(abstract, mesh))
    up = loaded["layers"][0]["up"].get_value()
    assert up.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_array_equal(up, state.params["layers"][0]["up"].get_value())
