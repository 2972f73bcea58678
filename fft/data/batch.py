"""The Batch contract: what every method's data ends as and every loss reads.

A Batch is a `dict[str, np.ndarray]`:

    tokens      [B, T] int32    token ids (padding = the tokenizer's pad id, or 0)
    positions   [B, T] int32    position of each token inside its segment (restarts at 0)
    segment_ids [B, T] int32    1..n per packed example in a row; 0 = padding
    loss_mask   [B, T] float32  1 where token t is a target (see `next_token_targets`)

Method fields (optional):

    labels      [B] int32 (class) / float32 (regression), or [B, C] float32 (multi-label)
    chosen_{tokens,positions,segment_ids,loss_mask}    [B, T]   preferred response (DPO, RM)
    rejected_{tokens,positions,segment_ids,loss_mask}  [B, T]   dispreferred response
    cand_{tokens,positions,segment_ids,loss_mask}      [B, K, T] K ranked responses
    ranks       [B, K] int32    rank of each candidate, 0 = best; -1 = padding candidate
    old_logprobs, advantages, returns, values   [B, T] float32 (PPO)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fft.config_lib import FFTError

Batch = dict  # dict[str, np.ndarray]; an alias so signatures read as the contract

REQUIRED_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")
FIELD_DTYPES = {
    "tokens": np.int32,
    "positions": np.int32,
    "segment_ids": np.int32,
    "loss_mask": np.float32,
}
# Prefixes of the four-field groups that method fields copy (pairs and K-way candidates).
GROUP_PREFIXES = ("", "chosen_", "rejected_", "cand_")


class BatchError(FFTError):
    """A Batch that breaks the contract (missing field, wrong shape or dtype)."""


def next_token_targets(batch: Mapping[str, np.ndarray]):
    """Inputs, targets and weights for next-token prediction, documenting the loss_mask convention.

    `loss_mask[b, t] = 1` means token `t` is a target predicted from position `t - 1`. So the
    first token of every segment has mask 0 (nothing in the same segment precedes it), and a loss
    computes `logits[:, :-1]` against `tokens[:, 1:]` weighted by `loss_mask[:, 1:]`.

    Returns:
      (inputs [B,T-1], targets [B,T-1], weights [B,T-1]) as numpy arrays.
    """
    tokens = np.asarray(batch["tokens"])
    return tokens[:, :-1], tokens[:, 1:], np.asarray(batch["loss_mask"])[:, 1:]


def validate_batch(batch: Mapping[str, np.ndarray], *, require=REQUIRED_FIELDS) -> None:
    """Checks the contract; raises BatchError naming the field and the problem.

    Every group of four fields (plain, `chosen_`, `rejected_`, `cand_`) that is present must be
    complete, share one shape ([B,T], or [B,K,T] for `cand_`) and have the contract dtypes.
    """
    if not isinstance(batch, Mapping):
        raise BatchError(f"a Batch is a dict of numpy arrays, got {type(batch).__name__}")
    for name in require:
        if name not in batch:
            raise BatchError(f"Batch is missing required field {name!r} (has {sorted(batch)})")
    batch_size = None
    for prefix in GROUP_PREFIXES:
        present = [prefix + f for f in REQUIRED_FIELDS if prefix + f in batch]
        if not present:
            continue
        if len(present) != len(REQUIRED_FIELDS):
            missing = [prefix + f for f in REQUIRED_FIELDS if prefix + f not in batch]
            raise BatchError(f"Batch has {present} but is missing {missing}")
        ndim = 3 if prefix == "cand_" else 2
        shape = None
        for field in REQUIRED_FIELDS:
            name = prefix + field
            x = batch[name]
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise BatchError(f"Batch field {name!r} is {type(x).__name__}, not an array")
            if x.ndim != ndim:
                raise BatchError(f"Batch field {name!r} has shape {x.shape}; expected {ndim} dims")
            if np.dtype(x.dtype) != FIELD_DTYPES[field]:
                raise BatchError(
                    f"Batch field {name!r} has dtype {x.dtype}; expected "
                    f"{np.dtype(FIELD_DTYPES[field]).name}"
                )
            if shape is None:
                shape = x.shape
            elif x.shape != shape:
                raise BatchError(
                    f"Batch field {name!r} has shape {x.shape}, but {prefix + 'tokens'!r} has "
                    f"{shape}"
                )
        if batch_size is None:
            batch_size = shape[0]
        elif shape[0] != batch_size:
            raise BatchError(f"Batch fields {prefix}* have batch size {shape[0]}, not {batch_size}")
    for name in ("labels", "ranks"):
        if name in batch and batch_size is not None and batch[name].shape[0] != batch_size:
            raise BatchError(
                f"Batch field {name!r} has leading dim {batch[name].shape[0]}, not {batch_size}"
            )


def pad_to(x: Sequence | np.ndarray, length: int, value=0, dtype=np.int32) -> np.ndarray:
    """Right-pads (or truncates) a 1-D sequence to `length`."""
    x = np.asarray(x, dtype=dtype)[:length]
    out = np.full((length,), value, dtype=dtype)
    out[: x.shape[0]] = x
    return out


def single_row(tokens, loss_mask, seq_len: int, *, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One example as one padded row (pad mode): the four required fields of shape [T]."""
    tokens = np.asarray(tokens, np.int32)[:seq_len]
    n = tokens.shape[0]
    loss_mask = np.asarray(loss_mask, np.float32)[:n].copy()
    if n:
        loss_mask[0] = 0.0  # the first token has no predecessor in its segment
    segment_ids = np.zeros((seq_len,), np.int32)
    segment_ids[:n] = 1
    return {
        "tokens": pad_to(tokens, seq_len, pad_id),
        "positions": pad_to(np.arange(n), seq_len, 0),
        "segment_ids": segment_ids,
        "loss_mask": pad_to(loss_mask, seq_len, 0.0, np.float32),
    }


def empty_row(seq_len: int, *, pad_id: int = 0) -> dict[str, np.ndarray]:
    """An all-padding row (segment 0, no loss), used to fill the last eval batch."""
    return single_row([], [], seq_len, pad_id=pad_id)


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> Batch:
    """Stacks per-row dicts (all with the same keys and shapes) into a Batch."""
    if not rows:
        raise BatchError("stack_rows: no rows")
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> Batch:
    """Pads a short batch up to `batch_size` rows with zeros (segment 0 = padding, no loss).

    `ranks` pads with -1 (padding candidate). Returns a new dict; the input is unchanged.
    """
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        n = v.shape[0]
        if n > batch_size:
            raise BatchError(f"pad_batch: field {k!r} has {n} rows > batch_size {batch_size}")
        fill = -1 if k == "ranks" else 0
        pad = np.full((batch_size - n,) + v.shape[1:], fill, v.dtype)
        out[k] = np.concatenate([v, pad]) if n < batch_size else v
    return out
