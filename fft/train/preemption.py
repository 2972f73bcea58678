"""Preemption: stop between steps, at the same step on every process, then save and exit.

`should_stop(step)` is called by the loop before every step. How it decides, cheapest first:

- one process: a local flag set by the SIGTERM handler; never a collective.
- several processes with JAX's preemption service (`jax.distributed.initialize` starts it
  unless `jax_enable_preemption_service` is off): `multihost_utils.
  reached_preemption_sync_point(step)`. The service's own SIGTERM handler notices the signal
  and agrees on a sync step with the other processes in the background (over the coordination
  service, not over the devices), so the per-step call is a local read. No Python handler is
  installed then: it would replace the service's and hide the notice from it.
- several processes without it: the local flag, agreed across processes with one small
  `process_allgather` every `check_every` steps only (the steps the loop would otherwise
  serialise host work on). A signalled run takes at most `check_every - 1` more steps to stop.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

log = logging.getLogger(__name__)


def preemption_service_active() -> bool:
    """True when this is a multi-process run whose JAX runtime has a preemption sync manager."""
    if jax.process_count() == 1:
        return False
    try:
        from jax._src import distributed  # the manager lives only here (no public accessor)
    except ImportError:  # pragma: no cover - a jax without it: fall back to the flag
        return False
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class PreemptionGuard:
    """Turns SIGTERM into a stop the loop checks between steps (then it saves and exits).

    Use as a context manager; a handler it installed is restored on exit. With several
    processes every process stops at the same step (see the module docstring), so every
    process joins the final save.

    Args:
      check_every: with several processes and no preemption service, agree on the flag every
        this many steps (>= 1). Unused otherwise.
      signals: the signals that mean "preempted" (handled in Python only where the preemption
        service is not in charge).
    """

    def __init__(self, check_every: int = 10, signals=(signal.SIGTERM,)):
        self.check_every = max(int(check_every), 1)
        self._signals = signals
        self._previous = {}
        self._flag = threading.Event()
        self._service = False

    def __enter__(self):
        self._service = preemption_service_active()
        if not self._service and threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        del frame
        log.warning("received signal %d: saving a checkpoint and stopping.", signum)
        self._flag.set()

    @property
    def signalled(self) -> bool:
        """Whether this process's own handler saw a signal (always False under the service)."""
        return self._flag.is_set()

    def should_stop(self, step: int) -> bool:
        """True at the step where every process stops; `step` = steps completed so far.

        Must be called with the same `step` sequence on every process (the loop's global step):
        the service and the every-`check_every` agreement both rely on it.
        """
        if self._service:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        if jax.process_count() == 1:
            return self._flag.is_set()
        if int(step) % self.check_every:
            return False  # between sync points: no collective
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self._flag.is_set()]))
        return bool(np.any(flags))
