"""Every method on two processes: the same results as one process with as many devices.

For a method's smoke config, `python -m fft.launch --num_processes=2 --devices_per_process=2 --
--config=configs/<m>.py:smoke` (a mesh over 4 devices of 2 processes) and one process with 4
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4`) train the same global batch
(`config.batch_size` is global) and must write the same `results.json` metrics (before and
after training) and the same global `tokens` count in `metrics.jsonl`.

Tolerances: the global batch at every step holds the same rows on 1 and 2 processes for every
method. Unpacked rows of one source (dpo, reward, transfer) are read in each process's blocks of
one global order; packed rows (pretrain, instruction) and mixtures (domain, continual: weighted
mixtures, continual's a growing shard stream) are read and packed globally by every process,
which keeps its slice (fft.data.pipeline.make_train_iterator); DPO's pairs and PPO's rollouts
are global and sliced per process. Only the order of float sums differs: rtol 1e-4 before
training, 1e-3 after, and the same token count exactly.

Each comparison costs two smoke runs (30-100 s each on 2 shared CPU cores); see SLOW.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# config: (rtol of metrics before training, after training, of the token count)
CASES = {
    c: (1e-4, 1e-3, 0.0)
    for c in (
        "pretrain:smoke", "instruction:smoke", "domain:smoke", "continual:smoke",
        "transfer:smoke", "reward:smoke", "dpo:smoke", "rlhf:smoke", "rlhf:smoke_grpo",
    )
}  # fmt: skip
# The whole file takes well over 8 minutes on 2 shared CPU cores (measured: continual 193 s,
# pretrain, instruction and domain ~90 s each at load average 7-11), so CI runs the packed and
# mixture cases instruction and domain plus dpo by default; these are marked slow (continual:
# the slowest, two eras of streamed shards).
SLOW = (
    "pretrain:smoke", "continual:smoke", "transfer:smoke", "reward:smoke", "rlhf:smoke",
    "rlhf:smoke_grpo",
)  # fmt: skip


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = " ".join(
        f
        for f in env.get("XLA_FLAGS", "").split()
        if "xla_force_host_platform_device_count" not in f
    )
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def _one_process(config: str, workdir: str) -> None:
    module, variant = config.split(":")
    args = [f"--config={ROOT}/configs/{module}.py:{variant}", f"--workdir={workdir}"]
    run = subprocess.run(
        [sys.executable, "-m", "fft.main", *args],
        env=_env(4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]


def _two_processes(config: str, workdir: str) -> None:
    from fft import launch

    module, variant = config.split(":")
    args = [f"--config={ROOT}/configs/{module}.py:{variant}", f"--workdir={workdir}"]
    out = io.StringIO()
    old = dict(os.environ)
    os.environ.update(_env(4))  # the launcher sets each process's device count itself
    try:
        status = launch.launch(
            args, num_processes=2, devices_per_process=2, platform="cpu", timeout=600, out=out
        )
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert status == 0, out.getvalue()[-4000:]


def _results(workdir: str) -> tuple[dict, int]:
    """(results.json, the last `tokens` of its metrics.jsonl train rows)."""
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    tokens = None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == "train":
                tokens = row["tokens"]
    return results, tokens


def _max_rel_diff(a: dict, b: dict) -> tuple[float, str]:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    worst, name = 0.0, ""
    for k in a:
        x, y = float(a[k]), float(b[k])
        if math.isnan(x) and math.isnan(y):
            continue
        d = abs(x - y) / max(abs(x), abs(y), 1e-3)
        if d > worst:
            worst, name = d, k
    return worst, name


@pytest.mark.parametrize(
    "config", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES]
)
def test_two_processes_match_one(config, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _one_process(config, one)
    _two_processes(config, two)
    (r1, t1), (r2, t2) = _results(one), _results(two)
    rtol_before, rtol_after, rtol_tokens = CASES[config]
    before = _max_rel_diff(r1["before"], r2["before"])
    after = _max_rel_diff(r1["after"], r2["after"])
    print(f"{config}: max rel diff before {before}, after {after}; tokens {t1} vs {t2}")
    assert before[0] <= rtol_before, (before, r1["before"], r2["before"])
    assert after[0] <= rtol_after, (after, r1["after"], r2["after"])
    assert t1 and abs(t1 - t2) <= rtol_tokens * t1, (t1, t2)
    assert r1["cost"]["target_tokens"] == t1 and r2["cost"]["target_tokens"] == t2
    assert r1["steps"] == r2["steps"]
