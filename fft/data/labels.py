"""Human ranking labels as `fft.label` appends them: undo lines and skips resolved.

The rankings file is append-only. Besides judgements (`ranking` records) it holds skips
(`"skipped": true`) and undo lines:

    {"prompt": str, "undo": true, "labeler": str, "time": iso8601, "undone": "ranking" | "skip"}

An undo line cancels the latest judgement (ranking or skip) that the same labeler made on the
same prompt and that is not undone already; nothing earlier in the file is rewritten. Every
reader of the file (the labeling session's restart, `fft.label --report`, the reward model and
DPO through `for_training`) goes through `live_judgements` so an undone judgement never counts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def is_undo(record: dict) -> bool:
    """True for an undo line."""
    return record.get("undo") is True


def live_judgements(records: Iterable[dict | None]) -> list[dict]:
    """The judgements that stand: undo lines applied and dropped, file order kept.

    Args:
      records: rankings-file records in file order (None entries, unreadable records a source
        skipped, are ignored).

    Returns:
      The ranking and skip records that no undo line cancelled.
    """
    kept: list[dict | None] = []
    latest: dict[tuple[str, str], list[int]] = {}  # (labeler, prompt) -> indices into kept
    for record in records:
        if record is None:
            continue
        key = (str(record.get("labeler", "")), str(record.get("prompt")))
        if is_undo(record):
            stack = latest.get(key)
            if stack:  # an undo with nothing left to undo changes nothing
                kept[stack.pop()] = None
            continue
        latest.setdefault(key, []).append(len(kept))
        kept.append(record)
    return [r for r in kept if r is not None]


def _may_hold_labels(source) -> bool:
    """False when a JSONL source's files cannot hold undo lines or skips (a byte search, so a
    large ranking file without them is not parsed twice)."""
    paths = getattr(source, "paths", None)
    if not paths or not all(isinstance(p, str | os.PathLike) for p in paths):
        return True
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        if b'"undo"' in data or b'"skipped"' in data:
            return True
    return False


def for_training(source):
    """A ranking source as a reward model or DPO should read it: undone and skipped judgements
    left out.

    Args:
      source: a random-access source (`len`, `source[i]`) or a list of ranking records.

    Returns:
      `source` itself when it holds no undo lines and no skips, else a list of the live,
      ranked records.
    """
    if not _may_hold_labels(source):
        return source
    records = [source[i] for i in range(len(source))]
    if not any(r is not None and (is_undo(r) or r.get("skipped")) for r in records):
        return source
    return [r for r in live_judgements(records) if not r.get("skipped")]
