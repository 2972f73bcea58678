"""Sequence packing: variable-length examples -> fixed [T] rows with segment ids and positions.

Packing is greedy and in order: examples are appended to the open row until the next one does
not fit, then the row is closed (padded) and the example starts a new row. Keeping the order makes
the packer's state a position in the example stream, which is what makes resume exact.

Row fields (the Batch contract, one row):
  tokens       the examples' tokens back to back, then pad_id
  positions    0..len-1 within each example (restart at 0 per segment), 0 on padding
  segment_ids  1..n for the n examples in the row, 0 on padding
  loss_mask    the examples' masks, with the first token of each segment forced to 0
An example longer than T is cut to T (callers normally truncate first, in formats.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from fft.data.batch import single_row, stack_rows


def build_row(
    segments: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, *, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """One packed row from (tokens, loss_mask) pairs whose total length is <= seq_len."""
    lengths = np.fromiter((len(t) for t, _ in segments), np.int64, len(segments))
    n = int(lengths.sum())
    if n > seq_len:
        raise ValueError(f"segments hold {n} tokens > seq_len {seq_len}")
    tokens = np.full((seq_len,), pad_id, np.int32)
    loss_mask = np.zeros((seq_len,), np.float32)
    positions = np.zeros((seq_len,), np.int32)
    segment_ids = np.zeros((seq_len,), np.int32)
    if n:
        tokens[:n] = np.concatenate([t for t, _ in segments])
        loss_mask[:n] = np.concatenate([m for _, m in segments])
        starts = np.cumsum(lengths) - lengths
        # positions = global index minus the start of the segment each token belongs to
        positions[:n] = np.arange(n) - np.repeat(starts, lengths)
        segment_ids[:n] = np.repeat(np.arange(1, len(segments) + 1, dtype=np.int32), lengths)
        loss_mask[starts[lengths > 0]] = 0.0  # a segment's first token has no predecessor
    return {
        "tokens": tokens,
        "positions": positions,
        "segment_ids": segment_ids,
        "loss_mask": loss_mask,
    }


class Packer:
    """Streaming greedy packer. `add(...)` returns the rows it completed (0, 1 or 2).

    Each example may carry a `tag` (the pipeline stores its stream position there); completed rows
    come back as `(row, tag of the row's first example)`, and `pending_tags()` lists the tags of
    examples not yet in a returned row, oldest first.
    """

    def __init__(self, seq_len: int, *, pad_id: int = 0):
        self.seq_len, self.pad_id = seq_len, pad_id
        self._segments: list[tuple[np.ndarray, np.ndarray]] = []
        self._tags: list = []
        self._used = 0

    def _close(self) -> tuple[dict[str, np.ndarray], object]:
        row = build_row(self._segments, self.seq_len, pad_id=self.pad_id)
        tag = self._tags[0] if self._tags else None
        self._segments, self._tags, self._used = [], [], 0
        return row, tag

    def add(self, tokens, loss_mask, tag=None) -> list[tuple[dict[str, np.ndarray], object]]:
        tokens = np.asarray(tokens, np.int32)[: self.seq_len]
        loss_mask = np.asarray(loss_mask, np.float32)[: len(tokens)]
        if not len(tokens):
            return []
        rows = []
        if self._used + len(tokens) > self.seq_len:
            rows.append(self._close())
        self._segments.append((tokens, loss_mask))
        self._tags.append(tag)
        self._used += len(tokens)
        if self._used == self.seq_len:
            rows.append(self._close())
        return rows

    def flush(self) -> list[tuple[dict[str, np.ndarray], object]]:
        """Closes the open row (if any) and returns it."""
        return [self._close()] if self._segments else []

    def pending_tags(self) -> list:
        return list(self._tags)

    def reset(self) -> None:
        self._segments, self._tags, self._used = [], [], 0


def pack(examples: Iterable[dict], seq_len: int, *, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Packs examples (dicts with 'tokens' and 'loss_mask') into rows; returns [N, T] arrays."""
    packer, rows = Packer(seq_len, pad_id=pad_id), []
    for ex in examples:
        rows += [row for row, _ in packer.add(ex["tokens"], ex["loss_mask"])]
    rows += [row for row, _ in packer.flush()]
    if not rows:
        return {k: v[None][:0] for k, v in build_row([], seq_len, pad_id=pad_id).items()}
    return stack_rows(rows)


def pad_examples(
    examples: Iterable[dict], seq_len: int, *, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Pad mode: one example per row (cut to seq_len); returns [N, T] arrays."""
    rows = [single_row(ex["tokens"], ex["loss_mask"], seq_len, pad_id=pad_id) for ex in examples]
    if not rows:
        return {k: v[None][:0] for k, v in single_row([], [], seq_len, pad_id=pad_id).items()}
    return stack_rows(rows)
