"""Starts a multi-process run on this machine: one process per device group, one coordinator.

    python -m fft.launch --num_processes=2 [--devices_per_process=4] -- \\
        --config=configs/pretrain.py:smoke --workdir=/tmp/run

Arguments after `--` go to `python -m fft.main`; a command that starts with a `.py` file or a
program name is run as given instead (`-- python my_script.py …`). Each process gets
`FFT_COORDINATOR_ADDRESS`, `FFT_NUM_PROCESSES`, `FFT_PROCESS_ID` (read by fft.distributed) and
its devices: on GPU a slice of `CUDA_VISIBLE_DEVICES`, on CPU `devices_per_process` fake
devices. Output is streamed line by line with a `[p<i>]` prefix; when any process fails, the
others are stopped and the launcher exits with that process's status.

This is for testing multi-host code on one machine and for multi-GPU nodes. Pods and clusters
start one process per host with their own tools (`gcloud … ssh --worker=all`, `srun`), and
fft.distributed picks the settings up from there.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port that was free a moment ago (the coordinator binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_gpus() -> int:
    """NVIDIA GPUs visible here (without importing jax, which would claim them)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _xla_flags_with_devices(flags: str, n: int) -> str:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
    return f"{flags} --xla_force_host_platform_device_count={n}".strip()


def process_env(
    base: dict[str, str],
    *,
    index: int,
    num_processes: int,
    coordinator: str,
    platform: str,
    devices_per_process: int | None,
) -> dict[str, str]:
    """The environment of process `index` (pure; see module docstring)."""
    env = dict(base)
    env.update(
        FFT_COORDINATOR_ADDRESS=coordinator,
        FFT_NUM_PROCESSES=str(num_processes),
        FFT_PROCESS_ID=str(index),
        PYTHONUNBUFFERED="1",  # lines arrive as they are printed, not at exit
    )
    # Children import the same fft as the launcher, also when running a script from elsewhere.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, base.get("PYTHONPATH")) if p)
    if platform == "gpu":
        visible = base.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(count_gpus())]
        per = devices_per_process or len(ids) // num_processes
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[index * per : (index + 1) * per])
    elif platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        if devices_per_process:
            env["XLA_FLAGS"] = _xla_flags_with_devices(
                base.get("XLA_FLAGS", ""), devices_per_process
            )
    return env


def child_command(args: list[str]) -> list[str]:
    """`fft.main` with `args`, or `args` itself when it names a script or a program."""
    if not args or args[0].startswith("-"):
        return [sys.executable, "-m", "fft.main", *args]
    if args[0].endswith(".py"):
        return [sys.executable, *args]
    return list(args)


def _pump(index: int, stream, out, lock: threading.Lock) -> None:
    prefix = f"[p{index}] "
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            out.flush()
    stream.close()


def _stop(procs: list[subprocess.Popen], sig=signal.SIGTERM) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)  # each child leads its own process group
            except ProcessLookupError:
                pass


def launch(
    args: list[str],
    *,
    num_processes: int,
    devices_per_process: int | None = None,
    platform: str = "auto",
    port: int | None = None,
    timeout: float | None = None,
    out=None,
) -> int:
    """Runs `num_processes` copies of the command; returns 0 or the first failure's status.

    Args:
      args: the arguments after `--` (see `child_command`).
      num_processes: processes to start (process 0 hosts the coordinator).
      devices_per_process: CPU: fake devices per process; GPU: GPUs per process (default:
        all GPUs split evenly).
      platform: 'cpu', 'gpu' or 'auto' (GPU when nvidia-smi lists one).
      port: coordinator port on localhost (default: a free one).
      timeout: seconds before every process is stopped and 124 returned.
      out: where prefixed output goes (default stdout).
    """
    out = out or sys.stdout
    if platform == "auto":
        platform = "gpu" if count_gpus() > 0 else "cpu"
    if platform == "gpu" and count_gpus() < num_processes * (devices_per_process or 1):
        print(
            f"fft.launch: {num_processes} processes x {devices_per_process or 1} GPUs requested, "
            f"{count_gpus()} visible.",
            file=sys.stderr,
        )
        return 2
    coordinator = f"localhost:{port or free_port()}"
    cmd = child_command(args)
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    lock = threading.Lock()
    for i in range(num_processes):
        env = process_env(
            dict(os.environ),
            index=i,
            num_processes=num_processes,
            coordinator=coordinator,
            platform=platform,
            devices_per_process=devices_per_process,
        )
        p = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        procs.append(p)
        t = threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True)
        t.start()
        pumps.append(t)

    status = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while [p.poll() for p in procs].count(None):  # poll every process, each round
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed:
                status = failed[0].returncode
                i = procs.index(failed[0])
                with lock:
                    print(f"fft.launch: process {i} exited with {status}; stopping the others.",
                          file=out, flush=True)  # fmt: skip
                _stop(procs)
                break
            if deadline is not None and time.monotonic() > deadline:
                with lock:
                    print(f"fft.launch: timeout after {timeout:.0f}s; stopping all processes.",
                          file=out, flush=True)  # fmt: skip
                _stop(procs)
                status = 124
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs, signal.SIGINT)
        status = 130
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _stop([p], signal.SIGKILL)
            p.wait()
    for t in pumps:
        t.join(timeout=5)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode != 0), 0)
    if status < 0:
        status = 128 - status  # killed by a signal
    return status


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="python -m fft.launch",
        description="Run a multi-process fft job on this machine (args after -- go to fft.main).",
    )
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=None)
    parser.add_argument("--platform", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=None)
    if "--" in argv:
        split = argv.index("--")
        own, rest = argv[:split], argv[split + 1 :]
    else:
        own, rest = argv, []
    ns = parser.parse_args(own)
    if ns.num_processes < 1:
        parser.error("--num_processes must be at least 1")
    return ns, rest


def main(argv: list[str] | None = None) -> int:
    ns, rest = _parse(sys.argv[1:] if argv is None else argv)
    return launch(
        rest,
        num_processes=ns.num_processes,
        devices_per_process=ns.devices_per_process,
        platform=ns.platform,
        port=ns.port,
        timeout=ns.timeout,
    )


if __name__ == "__main__":
    sys.exit(main())
