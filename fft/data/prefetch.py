"""Background prefetch of host batches: the next batches are built while the device computes.

`Prefetch(it, depth)` runs `next(it)` in one worker thread and hands the batches over through a
queue of `depth` slots. The wrapped iterator is touched by that thread only while it runs, and
`get_state()` reports the position after the last batch *consumed* (not the ones waiting in the
queue), so a checkpoint resumes exactly where training was; `set_state()` stops the worker,
drops what it had prefetched and restarts from the given position. An exception raised by the
wrapped iterator (bad record, `StopIteration`) reaches the consumer at the batch where it
happened. `stats` follows the consumed batches too.

Not for on-policy data (objects with `bind_state`, e.g. PPO/GRPO rollouts): their next batch
depends on the weights of the current step; `maybe_prefetch` leaves those alone, and those that
say `no_prefetch = True` (continual's era iterator, whose position the evals read).
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator
from typing import Any

_DONE = object()  # the worker's end-of-stream marker (StopIteration of the wrapped iterator)


class Prefetch:
    """Iterator wrapper that prefetches up to `depth` items in a background thread.

    Args:
      iterator: an iterator; its optional `get_state()` / `set_state()` / `stats` are kept
        exact with respect to the items consumed from this wrapper.
      depth: queue slots (>= 1): how many items may be ready ahead of the consumer.
    """

    def __init__(self, iterator: Iterator, depth: int = 2):
        if depth < 1:
            raise ValueError(f"Prefetch depth={depth} must be >= 1.")
        self._it = iterator
        self._depth = int(depth)
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._state = None  # the wrapped iterator's state after the last consumed item
        self._stats = None
        self._finished = False

    # -- iteration -------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        if self._thread is None:
            self._start()
        item, state, stats, error = self._queue.get()
        if error is not None:
            self._finished = True  # the worker has exited; the error is the stream's end
            self._join()
            raise error
        if item is _DONE:
            self._finished = True
            self._join()
            raise StopIteration
        self._state, self._stats = state, stats
        return item

    def _start(self):
        # The consumer's position before the first item comes from the wrapped iterator itself,
        # read here while no worker runs.
        self._state = _get_state(self._it)
        self._stats = _get_stats(self._it)
        self._queue = queue.Queue(maxsize=self._depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(self._queue, self._stop), name="fft-prefetch", daemon=True
        )
        self._thread.start()

    def _work(self, q: queue.Queue, stop: threading.Event):
        while not stop.is_set():
            try:
                item = next(self._it)
            except StopIteration:
                entry = (_DONE, None, None, None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
                entry = (None, None, None, e)
            else:
                entry = (item, _get_state(self._it), _get_stats(self._it), None)
            while not stop.is_set():  # put, but give up when asked to stop
                try:
                    q.put(entry, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if entry[0] is _DONE or entry[3] is not None:
                return

    # -- state -----------------------------------------------------------------------------

    def get_state(self) -> Any:
        """The wrapped iterator's state after the last item consumed from this wrapper."""
        if self._thread is None:
            return _get_state(self._it)
        return copy.deepcopy(self._state)

    def set_state(self, state: Any) -> None:
        """Stops the worker, drops prefetched items, and restores the wrapped iterator."""
        self.close()
        self._it.set_state(state)

    @property
    def stats(self):
        """The wrapped iterator's `stats` as of the last consumed item (None if it has none)."""
        if self._thread is None:
            return _get_stats(self._it)
        return self._stats

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the worker thread (after the item it is reading) and drops what it prefetched.

        The wrapped iterator is rewound to the consumed position (where it has `set_state`), so
        iterating again, here or on the wrapped iterator, continues with the next unconsumed
        item.
        """
        if self._thread is not None:
            self._stop.set()
            self._join()
            if self._state is not None and hasattr(self._it, "set_state"):
                self._it.set_state(copy.deepcopy(self._state))
        self._thread = self._queue = self._stop = None
        self._finished = False

    def _join(self):
        if self._thread is not None and self._thread is not threading.current_thread():
            self._stop.set()
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()  # let a daemon worker exit; never join from a finaliser


def _get_state(it):
    get = getattr(it, "get_state", None)
    return copy.deepcopy(get()) if get is not None else None


def _get_stats(it):
    stats = getattr(it, "stats", None)
    return copy.deepcopy(stats) if stats is not None else None


def maybe_prefetch(train_data, depth: int):
    """`train_data` wrapped in `Prefetch(depth)`, or unchanged when `depth` is 0, the data is
    on-policy (has `bind_state`: its batches depend on the live weights) or says
    `no_prefetch = True` (something else reads its position while training runs)."""
    if depth <= 0 or isinstance(train_data, Prefetch):
        return train_data
    if hasattr(train_data, "bind_state") or getattr(train_data, "no_prefetch", False):
        return train_data
    return Prefetch(train_data, depth)


def close(train_data) -> None:
    """Stops `train_data`'s worker if it is a `Prefetch` (no-op otherwise)."""
    if isinstance(train_data, Prefetch):
        train_data.close()
