"""Multi-host runs: joins JAX's distributed runtime before anything touches a device.

Every process of a run calls `initialize()` first; afterwards `jax.devices()` lists the devices
of all processes, a mesh built from it spans the hosts, and GSPMD does the rest. Where the
settings come from, first match wins:

1. explicit arguments (from `fft.main`'s flags `--coordinator_address`, `--num_processes`,
   `--process_id`);
2. the environment: `FFT_COORDINATOR_ADDRESS`, `FFT_NUM_PROCESSES`, `FFT_PROCESS_ID` (set by
   `python -m fft.launch`), or JAX's own `JAX_COORDINATOR_ADDRESS`;
3. a cluster JAX detects by itself: a Cloud TPU VM slice, SLURM (`srun`), Open MPI
   (`mpirun`), Kubernetes JobSets. There `jax.distributed.initialize()` takes no arguments.

Nothing found means a single-process run, and `initialize()` does nothing. `FFT_DISTRIBUTED=off`
forces that (e.g. one `srun` task that should not look for peers); `=on` insists on joining.

This module imports jax but never initialises a backend at import time: the distributed client
must exist before the first device is created.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
from collections.abc import Mapping

from absl import flags

from fft.config_lib import FFTError

log = logging.getLogger(__name__)

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-host runs (else from env)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes in a multi-host run (else from env)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes) (else from env)."
)

ENV_COORDINATOR = "FFT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "FFT_NUM_PROCESSES"
ENV_PROCESS_ID = "FFT_PROCESS_ID"
ENV_MODE = "FFT_DISTRIBUTED"  # auto (default) | on | off


class DistributedError(FFTError):
    """The distributed settings are incomplete or contradictory."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins a run. `None` fields are left to JAX's cluster detection."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cluster: str | None = None  # what was detected: 'explicit', 'slurm', 'tpu', 'ompi', 'k8s'


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} must be an integer.") from None


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """Names the multi-process cluster JAX can auto-configure here, or None.

    Only clusters with more than one process count: one SLURM task or one MPI rank is a plain
    single-process run, and joining a runtime there would only add start-up time.
    """
    env = os.environ if env is None else env
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "ompi"
    if env.get("JOBSET_NAME") and env.get("TPU_WORKER_HOSTNAMES"):
        return "k8s"
    # A Cloud TPU VM: TPU chips are attached (/dev/accel* on v2-v4, /dev/vfio on v5+).
    # JAX asks the metadata server for the slice's hosts; on a single-host slice that is
    # a one-process runtime, which is harmless.
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    has_chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    if has_chips and importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    return None


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings | None:
    """Works out how (and whether) to join a distributed run; pure, for tests.

    Args:
      coordinator_address, num_processes, process_id: explicit settings (flags); None = unset.
      env: environment to read (default `os.environ`).

    Returns:
      Settings, or None for a single-process run.

    Raises:
      DistributedError: explicit settings that are incomplete or inconsistent.
    """
    env = os.environ if env is None else env
    mode = env.get(ENV_MODE, "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise DistributedError(f"{ENV_MODE}={mode!r}: use auto, on or off.")
    if mode == "off":
        return None
    address = coordinator_address or env.get(ENV_COORDINATOR) or env.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else _int_env(env, ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _int_env(env, ENV_PROCESS_ID)
    if address or n is not None or pid is not None:
        missing = [
            name
            for name, v in (
                ("coordinator_address", address),
                ("num_processes", n),
                ("process_id", pid),
            )
            if v is None
        ]
        if missing and detect_cluster(env) is None:
            raise DistributedError(
                f"multi-host settings are incomplete: {', '.join(missing)} not given. Pass "
                "--coordinator_address, --num_processes and --process_id (or set "
                f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), or start the "
                "processes with `python -m fft.launch`."
            )
        if n is not None and n < 1:
            raise DistributedError(f"num_processes={n} must be at least 1.")
        if n is not None and pid is not None and not 0 <= pid < n:
            raise DistributedError(f"process_id={pid} is not in [0, num_processes={n}).")
        if n == 1 and not missing:
            return None  # one process: nothing to coordinate
        return Settings(address, n, pid, "explicit")
    cluster = detect_cluster(env)
    if cluster is not None:
        return Settings(cluster=cluster)
    if mode == "on":
        raise DistributedError(
            f"{ENV_MODE}=on but no coordinator is configured and no cluster was detected."
        )
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins the distributed runtime when this is a multi-process run; idempotent.

    Call before any jax operation. On CPU the cross-process collectives are gloo over TCP
    (JAX's default), so the same code runs on a laptop with several local processes.

    Returns:
      True when this process is (now) part of a multi-process runtime.
    """
    import jax  # deferred: importing this module must stay cheap for the flags

    if jax.distributed.is_initialized():
        return True
    settings = resolve(coordinator_address, num_processes, process_id)
    if settings is None:
        return False
    if settings.cluster == "explicit":
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
        )
    else:
        jax.distributed.initialize()  # the cluster (TPU VM, SLURM, MPI) supplies everything
    log.info(
        "distributed: process %d of %d (%s), %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        settings.cluster,
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def initialize_from_flags() -> bool:
    """`initialize` with `--coordinator_address/--num_processes/--process_id` (if parsed)."""
    if not flags.FLAGS.is_parsed():
        return initialize()
    return initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def is_main_process() -> bool:
    """True on process 0, the one that writes run files, metrics and results."""
    import jax

    return jax.process_index() == 0
