"""Prefetch: exact resume (the state is the consumed position), errors reach the consumer at
the batch where they happened, a clean shutdown, and which iterators are left alone."""

import json
import threading
import time

import numpy as np
import pytest

from fft.data import prefetch
from fft.data.pipeline import make_encoder, make_train_iterator


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class Counter:
    """0, 1, 2, ... with get_state/set_state and stats; optionally fails or ends at an index."""

    def __init__(self, fail_at=None, end_at=None, delay=0.0):
        self.i, self.fail_at, self.end_at, self.delay = 0, fail_at, end_at, delay
        self.produced = 0
        self.stats = {"seen": 0}

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay)
        if self.i == self.fail_at:
            raise ValueError(f"bad record at {self.i}")
        if self.i == self.end_at:
            raise StopIteration
        self.i += 1
        self.produced += 1
        self.stats["seen"] += 1
        return self.i - 1

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = int(state["i"])
        self.stats["seen"] = self.i


def _wait_until(cond, timeout=5.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_runs_ahead_but_state_is_the_consumed_position():
    inner = Counter()
    it = prefetch.Prefetch(inner, depth=3)
    assert it.get_state() == {"i": 0}  # before the first item
    assert _take(it, 2) == [0, 1]
    # The worker fills the queue (3) and holds one more waiting for a slot: 2 + 3 + 1 read.
    _wait_until(lambda: inner.produced == 6)
    assert it.get_state() == {"i": 2} and it.stats == {"seen": 2}
    it.close()


def test_exact_resume_through_the_real_pipeline(tokenizer, jsonl, make_corpus):
    texts = make_corpus(60, seed=3)
    path = jsonl("train.jsonl", [{"text": " ".join(texts[i : i + 3])} for i in range(0, 60, 2)])
    encode = make_encoder("text", tokenizer, max_len=24, truncation="split")
    kw = dict(seq_len=24, batch_size=3, packing=True, seed=7, shard_index=0, shard_count=1)
    plain = make_train_iterator(path, encode, **kw)
    reference = _take(plain, 12)

    it = prefetch.Prefetch(make_train_iterator(path, encode, **kw), depth=2)
    _assert_same(_take(it, 5), reference[:5])
    state = json.loads(json.dumps(it.get_state()))  # JSON-able, as checkpoints store it
    time.sleep(0.2)  # let the worker read ahead: the state must not move
    assert it.get_state() == state
    unwrapped = make_train_iterator(path, encode, **kw)
    _take(unwrapped, 5)
    assert state == json.loads(json.dumps(unwrapped.get_state()))  # same as without prefetch
    _assert_same(_take(it, 3), reference[5:8])
    it.close()

    # Restore into a fresh, prefetching iterator: the same next batches.
    resumed = prefetch.Prefetch(make_train_iterator(path, encode, **kw), depth=2)
    resumed.set_state(state)
    _assert_same(_take(resumed, 7), reference[5:12])
    # set_state while the worker runs drops what it prefetched.
    resumed.set_state(state)
    _assert_same(_take(resumed, 2), reference[5:7])
    resumed.close()


def test_worker_error_is_raised_in_the_consumer_at_its_batch():
    it = prefetch.Prefetch(Counter(fail_at=3), depth=2)
    assert _take(it, 3) == [0, 1, 2]
    assert it.get_state() == {"i": 3}
    with pytest.raises(ValueError, match="bad record at 3"):
        next(it)
    assert it._thread is None or not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)


def test_end_of_stream_is_stop_iteration():
    assert list(prefetch.Prefetch(Counter(end_at=5), depth=2)) == [0, 1, 2, 3, 4]


def test_close_stops_the_worker_and_rewinds_the_wrapped_iterator():
    inner = Counter(delay=0.01)
    it = prefetch.Prefetch(inner, depth=4)
    assert _take(it, 3) == [0, 1, 2]
    _wait_until(lambda: inner.produced >= 6)
    thread = it._thread
    before = {t.name for t in threading.enumerate()}
    it.close()
    assert not thread.is_alive() and "fft-prefetch" in before
    assert "fft-prefetch" not in {t.name for t in threading.enumerate()}
    assert inner.get_state() == {"i": 3}  # nothing prefetched is lost
    assert next(inner) == 3
    # Iterating the wrapper again restarts its worker from the wrapped iterator's position.
    assert _take(it, 2) == [4, 5]
    it.close()
    it.close()  # idempotent


def test_maybe_prefetch_leaves_on_policy_and_opted_out_data_alone():
    class OnPolicy(Counter):
        def bind_state(self, graphdef, state):
            pass

    class OptedOut(Counter):
        no_prefetch = True

    on_policy, opted_out, plain = OnPolicy(), OptedOut(), Counter()
    assert prefetch.maybe_prefetch(on_policy, 2) is on_policy
    assert prefetch.maybe_prefetch(opted_out, 2) is opted_out
    assert prefetch.maybe_prefetch(plain, 0) is plain
    wrapped = prefetch.maybe_prefetch(plain, 2)
    assert isinstance(wrapped, prefetch.Prefetch) and prefetch.maybe_prefetch(wrapped, 2) is wrapped
    prefetch.close(wrapped)
    prefetch.close(plain)  # no-op on anything else


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth=0"):
        prefetch.Prefetch(Counter(), depth=0)
