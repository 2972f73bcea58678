"""PreemptionGuard: no collective between sync points; the same stop step on every process.

The SIGTERM-saves-then-resumes path through the loop is tested in tests/test_checkpoint.py.
"""

import os
import signal
import socket
import subprocess
import sys

import jax
import pytest
from jax.experimental import multihost_utils

from fft.train import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _CountingAllgather:
    def __init__(self):
        self.steps = []

    def __call__(self, x):
        self.steps.append(self.current)
        return x[None]  # [processes, ...]: this process's flags only


def _fake_two_processes(monkeypatch, service: bool):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(preemption, "preemption_service_active", lambda: service)
    gather = _CountingAllgather()
    monkeypatch.setattr(multihost_utils, "process_allgather", gather)
    return gather


def test_fallback_agrees_only_every_n_steps(monkeypatch):
    gather = _fake_two_processes(monkeypatch, service=False)
    stopped_at = None
    with preemption.PreemptionGuard(check_every=10) as guard:
        for step in range(40):
            gather.current = step
            if step == 13:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the guard: sets its flag
            if guard.should_stop(step):
                stopped_at = step
                break
    assert guard.signalled
    assert stopped_at == 20  # the next sync point after the signal
    assert gather.steps == [0, 10, 20]  # no collective on any step in between


def test_service_is_asked_every_step_and_no_collective(monkeypatch):
    gather = _fake_two_processes(monkeypatch, service=True)
    asked = []

    def reached(step):
        asked.append(step)
        return step == 7

    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", reached)
    before = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionGuard(check_every=10) as guard:
        # The service's own handler must keep SIGTERM: nothing installed in Python.
        assert signal.getsignal(signal.SIGTERM) is before
        stopped_at = next(s for s in range(5, 100) if guard.should_stop(s))
    assert stopped_at == 7 and asked == [5, 6, 7]
    assert gather.steps == []


def test_single_process_never_gathers(monkeypatch):
    gather = _CountingAllgather()
    monkeypatch.setattr(multihost_utils, "process_allgather", gather)
    previous = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionGuard(check_every=10) as guard:
        assert not any(guard.should_stop(s) for s in range(3))
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop(3)  # seen at the very next step
    assert gather.steps == []
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored


_WORKER = """
import os, sys, time
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from fft.train import preemption
with preemption.PreemptionGuard(check_every=int(sys.argv[3])) as guard:
    print("SERVICE", preemption.preemption_service_active(), flush=True)
    for step in range(100000):
        if guard.should_stop(step):
            print("STOP", step, flush=True)
            break
        if step == 20:
            print("READY", flush=True)
        time.sleep(0.02)
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("service", [True, False], ids=["service", "fallback"])
def test_two_real_processes_stop_at_the_same_step(tmp_path, service):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["JAX_ENABLE_PREEMPTION_SERVICE"] = "true" if service else "false"
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), address, str(i), "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        lines = [[], []]
        for i, p in enumerate(procs):
            for line in p.stdout:
                lines[i].append(line)
                if line.startswith("READY"):
                    break
        assert all(any(line.startswith("READY") for line in ls) for ls in lines), lines
        procs[1].send_signal(signal.SIGTERM)  # only one process is preempted
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = ["".join(ls) + out for ls, out in zip(lines, outs, strict=True)]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
        assert f"SERVICE {service}" in out, out
    stops = [int(out.split("STOP ")[1].split()[0]) for out in outs]
    assert stops[0] == stops[1] > 20, outs
    if not service:
        assert stops[0] % 5 == 0  # agreed at a sync point only
