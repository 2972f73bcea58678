"""Multi-host on one machine: two CPU processes (gloo collectives), 4 fake devices each.

The two-process run uses an FSDP mesh spanning both processes (fsdp=8) and must match one
process with 8 devices: the same loss at every step and the same params. Checkpoints cross
over: the one written by two processes restores in one process on a different mesh, and the
one written by one process resumes training in two.

This file is also the worker: `python tests/test_distributed.py <mode> <workdir> …` is what
`fft.launch` starts in each process.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

BATCH, SEQ = 8, 16


# =============================================================================================
# What both sides run: the real training loop on a deterministic global batch
# =============================================================================================


class _Batches:
    """Global batch `step` from a seeded RNG; this process yields its own rows of it."""

    def __init__(self, vocab: int, process_index: int, process_count: int):
        self.vocab, self.step = vocab, 0
        rows = BATCH // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)

    def __next__(self):
        rng = np.random.default_rng(self.step)
        self.step += 1
        tokens = rng.integers(1, self.vocab, (BATCH, SEQ), dtype=np.int32)
        batch = {
            "tokens": tokens,
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
            "segment_ids": np.ones((BATCH, SEQ), np.int32),
            "loss_mask": np.concatenate(
                [np.zeros((BATCH, 1), np.float32), np.ones((BATCH, SEQ - 1), np.float32)], 1
            ),
        }
        return {k: v[self.rows] for k, v in batch.items()}

    def __iter__(self):
        return self

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = int(state["step"])


def _model_config():
    from fft.models import presets

    return presets.get_preset("micro").replace(n_layers=1)  # compile time is the test's cost


def _config(steps: int):
    from fft import config_lib

    c = config_lib.pretrain_config("micro")
    c.steps, c.batch_size, c.seq_len = steps, BATCH, SEQ
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over every device of every process
    c.checkpoint_every, c.keep_checkpoints, c.log_every, c.eval_every = 4, 3, 1, 0
    c.optim.warmup_steps = 1
    return c


def _train(workdir: str, steps: int) -> dict:
    from flax import nnx

    from fft.models.transformer import Transformer
    from fft.train import lm, trainer
    from fft.train.recipe import ModelSpec, Recipe, lm_batch_spec

    mc = _model_config()
    config = _config(steps)
    recipe = Recipe(
        method="pretrain",
        model=ModelSpec(lambda: Transformer(mc, rngs=nnx.Rngs(0)), None, mc),
        loss_fn=lm.next_token_loss_fn(),
        train_data=lambda ctx: _Batches(mc.vocab_size, ctx.shard.index, ctx.shard.count),
        batch_spec=lm_batch_spec(config.seq_len),
    )
    return trainer.fit(config, workdir, recipe)


def _worker(argv: list[str]) -> None:
    """Process side: train `wd_new` from scratch to 6 steps, resume `wd_resume` (step 4) to 6."""
    from fft import distributed

    assert distributed.initialize(), "the launcher did not configure a multi-process run"
    import jax

    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    wd_new, wd_resume = argv
    t0 = time.time()
    _train(wd_new, 6)
    t1 = time.time()
    _train(wd_resume, 6)
    print(
        f"worker {jax.process_index()} done ({t1 - t0:.0f}s + {time.time() - t1:.0f}s)", flush=True
    )


# =============================================================================================
# Tests
# =============================================================================================


def _train_losses(workdir: str) -> dict[int, float]:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("split") == "train":
                assert rec["step"] not in out, f"step {rec['step']} logged twice in {workdir}"
                out[rec["step"]] = rec["loss"]
    return out


def _restore_params(workdir: str, step: int, mesh_shape):
    """Restores TrainState `step` of `workdir` in this (single) process onto `mesh_shape`."""
    import jax
    from flax import nnx

    from fft import checkpoint, sharding
    from fft.models.transformer import Transformer
    from fft.train import optim
    from fft.train.state import TrainState, split_model

    mc = _model_config()
    config = _config(step)
    mesh = sharding.make_mesh(*mesh_shape)

    def init():
        _, params, frozen = split_model(Transformer(mc, rngs=nnx.Rngs(0)))
        tx, _ = optim.make_optimizer(config.optim, step, params)
        return TrainState(
            step=jax.numpy.zeros((), jax.numpy.int32),
            params=params,
            frozen=frozen,
            opt_state=tx.init(params),
            rng=jax.random.key(0),
        )

    abstract = jax.eval_shape(init)
    target = sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    state, _ = ckpt.restore(step, target)
    ckpt.close()
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding.mesh.shape == mesh.shape, "restore did not reshard onto the new mesh"
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(state.params) if hasattr(v, "shape")} | {
        "step": np.asarray(state.step)
    }


def _assert_same_params(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        # Cross-process reductions sum in another order; Adam's m / sqrt(v) turns that float
        # noise into up to ~1% of one lr step (lr 3e-3) where a gradient is almost zero.
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-4, err_msg=str(k))


def test_two_processes_match_one_and_checkpoints_cross(tmp_path, monkeypatch):
    import io

    from fft import launch

    # One process, 8 devices: 6 steps, checkpoints at 4 and 6.
    one = str(tmp_path / "one")
    _train(one, 6)
    one_losses = _train_losses(one)
    assert sorted(one_losses) == [1, 2, 3, 4, 5, 6]
    # The 1-process checkpoint of step 4, alone in a workdir, for the two processes to resume.
    resume = str(tmp_path / "resume_in_two")
    os.makedirs(os.path.join(resume, "checkpoints"))
    shutil.copytree(os.path.join(one, "checkpoints", "4"), os.path.join(resume, "checkpoints", "4"))

    # Two processes x 4 devices, FSDP over all 8: a fresh run (same schedule: 6 steps), and a
    # resume of the 1-process checkpoint (step 4) up to step 6.
    two = str(tmp_path / "two")
    # The workers' second run reuses the first one's executable (same HLO) from this cache.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    out = io.StringIO()
    status = launch.launch(
        [os.path.abspath(__file__), two, resume],
        num_processes=2,
        devices_per_process=4,
        platform="cpu",
        timeout=240,
        out=out,
    )
    log = out.getvalue()
    assert status == 0, log[-4000:]
    assert "[p0] worker 0 done" in log and "[p1] worker 1 done" in log, log[-2000:]
    print("\n".join(ln for ln in log.splitlines() if "done" in ln))

    # Same loss at every step; metrics written once (a step logged twice fails above).
    two_losses = _train_losses(two)
    assert sorted(two_losses) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(
        [two_losses[s] for s in range(1, 7)], [one_losses[s] for s in range(1, 7)], rtol=1e-5
    )
    resumed = _train_losses(resume)
    np.testing.assert_allclose([resumed[5], resumed[6]], [one_losses[5], one_losses[6]], rtol=1e-5)
    with open(os.path.join(two, "results.json")) as f:
        assert json.load(f)["steps"] == 6
    # Each process's data position is in the checkpoint (gathered to the primary host).
    with open(os.path.join(two, "checkpoints", "6", "data", "metadata")) as f:
        assert json.load(f)["data_by_process"] == [{"step": 6}, {"step": 6}]

    # Written by two processes -> restored in one, resharded (fsdp=8 -> data=2 x fsdp=4).
    _assert_same_params(_restore_params(two, 6, (2, 4, 1)), _restore_params(one, 6, (1, 8, 1)))
    # Written by one process -> resumed by two: same params at step 6.
    _assert_same_params(_restore_params(resume, 6, (1, 8, 1)), _restore_params(one, 6, (1, 8, 1)))


def test_resolve_settings():
    import pytest

    from fft import distributed

    assert distributed.resolve(env={}) is None  # a laptop: single process
    s = distributed.resolve(
        env={
            "FFT_COORDINATOR_ADDRESS": "h:1234",
            "FFT_NUM_PROCESSES": "2",
            "FFT_PROCESS_ID": "1",
        }
    )
    assert (s.coordinator_address, s.num_processes, s.process_id, s.cluster) == (
        "h:1234", 2, 1, "explicit",
    )  # fmt: skip
    # Flags win over the environment.
    s = distributed.resolve("a:1", 4, 3, env={"FFT_COORDINATOR_ADDRESS": "h:1"})
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("a:1", 4, 3)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "3"}
    assert distributed.resolve(env=slurm).cluster == "slurm"
    assert distributed.resolve(env={**slurm, "FFT_DISTRIBUTED": "off"}) is None
    assert distributed.resolve(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    with pytest.raises(distributed.DistributedError, match="process_id"):
        distributed.resolve("h:1", 2, None, env={})
    with pytest.raises(distributed.DistributedError, match="not in"):
        distributed.resolve("h:1", 2, 2, env={})


def test_launch_env_and_failure(tmp_path):
    import io

    from fft import launch

    env = launch.process_env(
        {"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"},
        index=1,
        num_processes=2,
        coordinator="localhost:5",
        platform="cpu",
        devices_per_process=4,
    )
    assert env["FFT_PROCESS_ID"] == "1" and env["FFT_NUM_PROCESSES"] == "2"
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    gpu = launch.process_env(
        {"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
        index=1,
        num_processes=2,
        coordinator="localhost:5",
        platform="gpu",
        devices_per_process=None,
    )
    assert gpu["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert launch.child_command(["--config=c.py"])[1:] == ["-m", "fft.main", "--config=c.py"]

    # One process fails -> the other is stopped and the launcher reports the failure.
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['FFT_PROCESS_ID'] == '1':\n"
        "    print('boom'); sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    out = io.StringIO()
    status = launch.launch([str(script)], num_processes=2, platform="cpu", out=out, timeout=50)
    assert status == 3, out.getvalue()
    assert "[p1] boom" in out.getvalue()


if __name__ == "__main__":
    _worker(sys.argv[1:])
