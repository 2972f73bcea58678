"""Training and eval data pipelines: shuffle, shard per host, mix, encode, pack, batch.

    sources --(grain MapDataset: shard per host, shuffle per epoch)--> records
            --(weighted interleave of several sources)--> records
            --(encode_fn: formats.encode_record)--> examples
            --(Packer, or one example per row)--> rows --> Batches (numpy)

grain provides the per-host shard (and, for big sources, the per-epoch index shuffle) of each
random-access source; index maps are stateless, so a source's position is one integer. Mixing,
packing and streaming are a small hand-written iterator because their state must be exact:
`get_state()` is the stream position just before the oldest example not yet delivered in a batch
(plus the counters at that point), so `set_state()` re-reads those few examples and continues
with exactly the next batch.

Several hosts: `batch_size` is the global batch and every host yields its rows of it, so that
the global batch at a step is the same whatever the number of hosts. Unpacked rows of one
random-access source: each host reads only its blocks of the global order (`_IndexStream`);
packed rows, mixtures and shard streams: each host reads and packs the whole global stream and
keeps its slice of each global batch (see make_train_iterator).

Mixture weights can change on resume: each source keeps its own position, and the interleave
then follows the new weights from that point.
"""

from __future__ import annotations

import collections
import copy
import functools
from collections.abc import Callable, Sequence

import numpy as np

from fft.config_lib import FFTError
from fft.data import formats
from fft.data.batch import pad_batch, single_row
from fft.data.packing import Packer
from fft.data.sources import BadRecordError, ShardStream, open_source

STATE_VERSION = 1
_GRAIN_SHUFFLE_MIN = 1 << 22
STAT_NAMES = ("records", "examples", "skipped_records", "dropped_too_long", "truncated")


def make_encoder(fmt: str, tokenizer, *, max_len: int, **kwargs) -> Callable[[dict], object]:
    """`encode_record` with everything but the record bound (kwargs as encode_record's)."""
    return functools.partial(
        formats.encode_record, fmt=fmt, tokenizer=tokenizer, max_len=max_len, **kwargs
    )


# ------------------------------------------------------------------------------------------------
# Record streams (each: next_record() -> (record | None, origin()), get_state(), set_state())
# ------------------------------------------------------------------------------------------------


class _IndexStream:
    """A random-access source in shuffled order: this host's blocks of one global order.

    Every host computes the same global order (a permutation of all records per epoch, seeded
    by (seed, epoch); beyond _GRAIN_SHUFFLE_MIN records grain's O(1)-memory index shuffle, which
    is slow per index for small datasets, fast for big ones). Host `i` of `P` reads it in blocks
    of `block` records: its k-th record is global position `(k // block) * block * P + i * block
    + k % block`. With `block` = the rows each host puts in a batch and one record per row, the
    global batch at step s is positions `[s*B, (s+1)*B)` whatever the number of hosts, so 1 and
    N hosts train on the same rows; in every case no two hosts read the same position.
    """

    def __init__(self, source, *, seed, shuffle, num_epochs, shard_index, shard_count, block=1):
        import grain

        self.source, self.num_epochs, self.seed, self.shuffle = source, num_epochs, seed, shuffle
        self.shard_index, self.shard_count, self.block = shard_index, shard_count, max(block, 1)
        self._order = grain.MapDataset.range(len(source))
        self._n = len(self._order)
        self._grain_shuffle = shuffle and self._n >= _GRAIN_SHUFFLE_MIN
        if self._grain_shuffle:
            # ShuffleMapDataset maps index i to epoch i // n with seed + epoch: new order per epoch.
            self._order = self._order.shuffle(seed=seed % 2**32)
        self._perm_epoch, self._perm = -1, None
        self._pos = 0  # records this host has read (its own positions)

    def _global(self, pos: int) -> int:
        """The global position of this host's `pos`-th record (see the class docstring)."""
        blocks, within = divmod(pos, self.block)
        return (blocks * self.shard_count + self.shard_index) * self.block + within

    def _index(self, pos: int) -> int:
        if self._grain_shuffle:
            return int(self._order[pos])
        epoch, i = divmod(pos, self._n)
        if not self.shuffle:
            return int(self._order[i])
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed % 2**32, epoch])
            self._perm, self._perm_epoch = rng.permutation(self._n), epoch
        return int(self._order[int(self._perm[i])])

    def next_record(self):
        position = self._global(self._pos)
        if self._n == 0 or (self.num_epochs is not None and position >= self.num_epochs * self._n):
            raise StopIteration
        index = self._index(position)
        self._pos += 1
        return self.source[index], functools.partial(self._origin, index)

    def _origin(self, index):
        origin = getattr(self.source, "origin", None)
        return origin(index) if origin else f"record {index}"

    def get_state(self):
        return {"pos": self._pos}

    def set_state(self, state):
        self._pos = int(state["pos"])

    def describe(self) -> str:
        paths = getattr(self.source, "paths", None)
        return ", ".join(map(str, paths)) if paths else type(self.source).__name__


class _ShardedStream:
    """A ShardStream, of which this host takes its blocks of `block` records of each shard
    (block `j` of a shard goes to host `j % shard_count`, as `_IndexStream` does globally)."""

    def __init__(self, stream: ShardStream, *, shard_index, shard_count, block=1):
        self.stream, self.shard_index, self.shard_count = stream, shard_index, shard_count
        self.block = max(block, 1)

    def next_record(self):
        while True:
            record, where = self.stream.next_record()
            position = self.stream.get_state()["record"] - 1
            if (position // self.block) % self.shard_count == self.shard_index:
                return record, lambda where=where: where

    def get_state(self):
        return self.stream.get_state()

    def set_state(self, state):
        self.stream.set_state(state)


class _Mixture:
    """Deterministic weighted interleave: the next record comes from the source furthest behind
    its share, i.e. argmin_i (n_i + 1) / w_i, where n_i counts records since the weights were set.
    Exhausted sources drop out; the mixture ends when all are exhausted."""

    def __init__(self, streams, weights):
        self.streams = streams
        self.weights = [float(w) for w in weights]
        k = len(streams)
        self.counts, self.base, self.exhausted = [0] * k, [0] * k, [False] * k

    def next_record(self):
        while True:
            live = [
                i for i in range(len(self.streams)) if not self.exhausted[i] and self.weights[i] > 0
            ]
            if not live:
                raise StopIteration
            i = min(live, key=lambda i: ((self.counts[i] - self.base[i] + 1) / self.weights[i], i))
            try:
                out = self.streams[i].next_record()
            except StopIteration:
                self.exhausted[i] = True
                continue
            self.counts[i] += 1
            return out

    def pass_length(self) -> int | None:
        """Records in one pass over every source; None when the mixture ends by itself (a
        source read a set number of epochs) or cannot tell (a growing shard stream)."""
        if not all(isinstance(s, _IndexStream) and s.num_epochs is None for s in self.streams):
            return None
        return sum(s._n for s in self.streams)

    def describe(self) -> str:
        return "; ".join(s.describe() for s in self.streams if hasattr(s, "describe"))

    def get_state(self):
        return {
            "streams": [s.get_state() for s in self.streams],
            "counts": list(self.counts),
            "base": list(self.base),
            "weights": list(self.weights),
            "exhausted": list(self.exhausted),
        }

    def set_state(self, state):
        if len(state["streams"]) != len(self.streams):
            raise FFTError(
                f"data state has {len(state['streams'])} sources but the config gives "
                f"{len(self.streams)}; resume with the same list of sources"
            )
        for stream, s in zip(self.streams, state["streams"], strict=True):
            stream.set_state(s)
        self.counts, self.exhausted = list(state["counts"]), list(state["exhausted"])
        old = np.asarray(state["weights"]) / max(sum(state["weights"]), 1e-12)
        new = np.asarray(self.weights) / max(sum(self.weights), 1e-12)
        # New weights apply from here on: count shares from the current position.
        self.base = list(state["base"]) if np.allclose(old, new) else list(self.counts)


# ------------------------------------------------------------------------------------------------
# The iterator
# ------------------------------------------------------------------------------------------------


def _example_row(ex: dict, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pad mode: one example (any format) as one row of Batch fields."""
    row = {}
    if "tokens" in ex:
        row.update(single_row(ex["tokens"], ex["loss_mask"], seq_len, pad_id=pad_id))
    for prefix in ("chosen_", "rejected_"):
        if prefix + "tokens" in ex:
            r = single_row(ex[prefix + "tokens"], ex[prefix + "loss_mask"], seq_len, pad_id=pad_id)
            row.update({prefix + k: v for k, v in r.items()})
    if "cand_tokens" in ex:
        cands = [
            single_row(t, m, seq_len, pad_id=pad_id)
            for t, m in zip(ex["cand_tokens"], ex["cand_loss_mask"], strict=True)
        ]
        row.update({"cand_" + k: np.stack([c[k] for c in cands]) for k in cands[0]})
        row["ranks"] = np.asarray(ex["ranks"], np.int32)
    if "label" in ex:
        row["labels"] = np.asarray(ex["label"])
    return row


def _stack(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    batch = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key.startswith("cand_") or key == "ranks":
            k_max = max(v.shape[0] for v in values)  # pad candidate lists to the batch's max K
            fill = -1 if key == "ranks" else 0
            values = [
                np.concatenate([v, np.full((k_max - v.shape[0],) + v.shape[1:], fill, v.dtype)])
                for v in values
            ]
        x = np.stack(values)
        if key == "labels":
            x = x.astype(np.int32 if x.dtype.kind in "iub" else np.float32)
        batch[key] = x
    return batch


class DataIterator:
    """Iterator of numpy Batches with exact, JSON-able `get_state()` / `set_state()`.

    Attributes:
      stats: counters for metrics — records read, examples produced, skipped_records (bad
        records skipped), dropped_too_long, truncated.
    """

    def __init__(
        self,
        mixture: _Mixture,
        encode_fn: Callable,
        *,
        seq_len: int,
        batch_size: int,
        packing: bool,
        pad_id: int,
        on_bad_record: str,
        drop_remainder: bool,
        keep: tuple[int, int] | None = None,
    ):
        self._mixture, self._encode = mixture, encode_fn
        # Rows [lo, hi) of each batch of `batch_size` rows are yielded (None: all of them).
        self._keep = keep
        self.seq_len, self.batch_size, self.packing = seq_len, batch_size, packing
        self.pad_id, self.on_bad_record, self.drop_remainder = pad_id, on_bad_record, drop_remainder
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        self._packer = Packer(seq_len, pad_id=pad_id)
        self._rows = collections.deque()  # completed rows not yet in a batch: (row, tag)
        self._chunks = collections.deque()  # encoded examples not yet packed: (example, tag)
        self._skip_chunks = 0
        self._ended = False
        self._fruitless = 0  # records read since the last one that gave an example

    def __iter__(self):
        return self

    # -- examples --------------------------------------------------------------------------------

    def _read_examples(self) -> None:
        """Reads records until at least one example is queued; StopIteration at the end."""
        while not self._chunks:
            # The tag of a record's examples: where the stream was before it, and the counters.
            snapshot = (self._mixture.get_state(), dict(self.stats))
            self._check_progress()
            record, origin = self._mixture.next_record()
            self.stats["records"] += 1
            self._fruitless += 1
            if record is None:  # a source in skip mode read a bad record
                self.stats["skipped_records"] += 1
                continue
            try:
                out = self._encode(record)
            except BadRecordError as e:
                if self.on_bad_record == "error":
                    raise BadRecordError(f"{origin()}: {e}") from None
                self.stats["skipped_records"] += 1
                continue
            if out is None or (isinstance(out, list) and not out):
                self.stats["dropped_too_long"] += 1
                continue
            self._fruitless = 0
            examples = out if isinstance(out, list) else [out]
            self.stats["truncated"] += int(any(ex.get("truncated") for ex in examples))
            self.stats["examples"] += len(examples)
            tagged = [(ex, (snapshot, j)) for j, ex in enumerate(examples)]
            self._chunks.extend(tagged[self._skip_chunks :])
            self._skip_chunks = 0

    def _check_progress(self) -> None:
        """Raises when a whole pass over the data gave no example (else a repeating iterator
        would spin forever on data that is all skipped or all too long)."""
        n = self._mixture.pass_length()
        if n is None or self._fruitless < n:
            return
        raise FFTError(
            f"no usable example in {self._fruitless} records in a row of {self._mixture.describe()}"
            f": {self.stats['skipped_records']} bad records skipped (data.on_bad_record=skip), "
            f"{self.stats['dropped_too_long']} dropped as longer than seq_len={self.seq_len}"
        )

    def _fill_rows(self) -> None:
        while len(self._rows) < self.batch_size and not self._ended:
            try:
                self._read_examples()
            except StopIteration:
                self._ended = True
                if self.packing:
                    self._rows.extend(self._packer.flush())
                break
            ex, tag = self._chunks.popleft()
            if self.packing:
                self._rows.extend(self._packer.add(ex["tokens"], ex["loss_mask"], tag))
            else:
                self._rows.append((_example_row(ex, self.seq_len, self.pad_id), tag))

    def __next__(self) -> dict[str, np.ndarray]:
        self._fill_rows()
        if not self._rows or (self.drop_remainder and len(self._rows) < self.batch_size):
            raise StopIteration
        n = min(self.batch_size, len(self._rows))
        rows = [self._rows.popleft()[0] for _ in range(n)]
        batch = pad_batch(_stack(rows), self.batch_size)
        if self._keep is None:
            return batch
        lo, hi = self._keep
        return {k: v[lo:hi] for k, v in batch.items()}

    # -- state -----------------------------------------------------------------------------------

    def get_state(self) -> dict:
        """JSON-able position: just before the oldest example not yet delivered in a batch."""
        if self._rows:
            tag = self._rows[0][1]
        elif self._packer.pending_tags():
            tag = self._packer.pending_tags()[0]
        elif self._chunks:
            tag = self._chunks[0][1]
        else:
            tag = ((self._mixture.get_state(), dict(self.stats)), self._skip_chunks)
        (mixture_state, stats), skip = tag
        return {
            "version": STATE_VERSION,
            "mixture": copy.deepcopy(mixture_state),
            "stats": dict(stats),
            "skip_chunks": skip,
        }

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise FFTError(
                f"data iterator state has version {state.get('version')}, expected {STATE_VERSION}"
            )
        self._mixture.set_state(copy.deepcopy(state["mixture"]))
        self.stats = dict.fromkeys(STAT_NAMES, 0) | dict(state["stats"])
        self._skip_chunks = int(state["skip_chunks"])
        self._packer.reset()
        self._rows.clear()
        self._chunks.clear()
        self._ended = False
        self._fruitless = 0


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------


def _host_shard(shard_index, shard_count):
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise FFTError(f"shard_index {shard_index} is not in [0, {shard_count})")
    return shard_index, shard_count


def _is_stream(source) -> bool:
    return isinstance(source, ShardStream) or (
        isinstance(source, str) and source.startswith("stream:")
    )


def _as_stream(source, i, *, seed, shuffle, num_epochs, shard, block, on_bad_record):
    if isinstance(source, str) and source.startswith("stream:"):
        source = ShardStream(source[len("stream:") :], on_bad_record=on_bad_record)
    if isinstance(source, ShardStream):  # streaming: in order, never shuffled or repeated
        return _ShardedStream(source, shard_index=shard[0], shard_count=shard[1], block=block)
    source = open_source(source, on_bad_record=on_bad_record)
    return _IndexStream(
        source,
        seed=seed + 7919 * i,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard[0],
        shard_count=shard[1],
        block=block,
    )


def rows_per_process(batch_size: int, process_count: int) -> int:
    """The rows each of `process_count` processes reads of a global batch of `batch_size`.

    Raises:
      FFTError: when the global batch does not divide over the processes.
    """
    if batch_size <= 0 or batch_size % process_count:
        fits = max(-(-batch_size // process_count), 1) * process_count
        raise FFTError(
            f"config.batch_size={batch_size} is the global batch and must divide over the "
            f"{process_count} processes (each reads batch_size / {process_count} rows of it): "
            f"use e.g. --config.batch_size={fits}."
        )
    return batch_size // process_count


def _build(
    sources,
    encode_fn,
    *,
    weights,
    seed,
    shuffle,
    num_epochs,
    shard_index,
    shard_count,
    on_bad_record,
    batch_size,
    **kwargs,
):
    many = isinstance(sources, list | tuple)
    sources = list(sources) if many else [sources]
    if weights is None:
        weights = [1.0] * len(sources)
    if len(weights) != len(sources) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise FFTError(f"mixture weights {list(weights)} do not fit {len(sources)} sources")
    shard = _host_shard(shard_index, shard_count)
    rows = rows_per_process(batch_size, shard[1])
    keep = None
    one_indexed = len(sources) == 1 and not _is_stream(sources[0])
    if (kwargs["packing"] or not one_indexed) and shard[1] > 1:
        # A packed row depends on the examples packed before it, and a mixture's (or a shard
        # stream's) next record on every record before it, so every host reads and packs the
        # whole global stream into global batches and keeps its rows of each: the same global
        # batch (and data state) on any number of hosts, for N times the host encoding.
        keep, rows = (shard[0] * rows, (shard[0] + 1) * rows), batch_size
        shard = (0, 1)
    # Unpacked, batch_size is the global batch: this host reads its rows of it, in blocks of
    # that many records of the global order (see _IndexStream).
    streams = [
        _as_stream(
            s,
            i,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            shard=shard,
            block=rows,
            on_bad_record=on_bad_record,
        )
        for i, s in enumerate(sources)
    ]
    return DataIterator(
        _Mixture(streams, weights), encode_fn, on_bad_record=on_bad_record, batch_size=rows,
        keep=keep, **kwargs,
    )  # fmt: skip


def make_train_iterator(
    sources,
    encode_fn: Callable,
    *,
    seq_len: int,
    batch_size: int,
    packing: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    pad_id: int = 0,
    on_bad_record: str = "error",
) -> DataIterator:
    """An endless (or num_epochs-long) iterator of training Batches with exact resume.

    Args:
      sources: one source or a list (mixture). Each is a spec string for `open_source` (file,
        glob, directory, `tfds:name/split`), `stream:DIR` or a `ShardStream` (growing shard
        directory, read in order), or a random-access object (len, [i], optional origin(i)).
      encode_fn: record -> example dict (see formats.encode_record), list of them, or None (drop).
        `make_encoder(fmt, tokenizer, max_len=seq_len)` builds one.
      seq_len: T of every row.
      batch_size: the GLOBAL batch (config.batch_size). This process yields batch_size /
        shard_count rows (an FFTError when that does not divide), and the global batch at step
        s (the processes' rows in process order) is the same whatever the number of processes.
        With one random-access source and one example per row (packing=False) each process
        reads only its blocks of that many records of one global order. With packing (a row
        depends on every example packed before it), a mixture or a shard stream, each process
        reads, encodes and packs the whole global stream into
        global batches of batch_size rows and keeps its slice `[i * rows, (i + 1) * rows)` of
        each: the host tokenizes shard_count times more (cheap next to a train step), and
        `get_state()` and `stats` (global counts) are the same on every process, so such a
        run can resume on another number of processes.
      packing: pack several examples per row (segment ids); False: one example per row (required
        for preference/ranking/classification).
      shuffle: reshuffle random-access sources every epoch (grain index shuffle).
      seed: shuffle seed (source i uses seed + 7919 * i).
      weights: mixture weights, one per source (default equal); may change on resume.
      num_epochs: None repeats forever; else each random-access source is read this many times.
      shard_index, shard_count: this host's shard (default jax.process_index()/process_count()).
      pad_id: token id of padding.
      on_bad_record: 'error' (BadRecordError naming file:line) or 'skip' (counted in stats).

    Returns:
      A DataIterator (`next(it)` -> Batch; `it.get_state()`, `it.set_state(s)`, `it.stats`).
    """
    return _build(
        sources, encode_fn, weights=weights, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
        shard_index=shard_index, shard_count=shard_count, on_bad_record=on_bad_record,
        seq_len=seq_len, batch_size=batch_size, packing=packing, pad_id=pad_id,
        drop_remainder=True,
    )  # fmt: skip


def make_eval_batches(
    sources,
    encode_fn: Callable,
    *,
    seq_len: int,
    batch_size: int,
    packing: bool = False,
    max_batches: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    pad_id: int = 0,
    on_bad_record: str = "error",
) -> list[dict[str, np.ndarray]]:
    """Every example of `sources` once, in order, as a list of Batches (the last one padded with
    empty rows: segment_ids 0, loss_mask 0, so it adds nothing to sums).

    Evals are global computations: by default every process builds the same batches of the
    whole source (`batch_size` rows each), so every process runs the same number of eval
    steps and computes the same numbers. Give shard_index / shard_count to read a shard
    instead (then `batch_size` is divided over shard_count, as for training).
    """
    if shard_index is None and shard_count is None:
        shard_index, shard_count = 0, 1
    it = _build(
        sources, encode_fn, weights=None, seed=0, shuffle=False, num_epochs=1,
        shard_index=shard_index, shard_count=shard_count, on_bad_record=on_bad_record,
        seq_len=seq_len, batch_size=batch_size, packing=packing, pad_id=pad_id,
        drop_remainder=False,
    )  # fmt: skip
    batches = []
    for batch in it:
        batches.append(batch)
        if max_batches is not None and len(batches) >= max_batches:
            break
    return batches
