"""Metric writers (metrics.jsonl + TensorBoard), progress bar, step timer, NaN guard, tables.

Only process 0 writes files; every process may call the writers.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fft import paths
from fft.config_lib import FFTError


class NonFiniteError(FFTError):
    """A metric (usually the loss) became NaN or infinite; the run stops naming the step."""


def _scalar(v) -> float | None:
    try:
        arr = np.asarray(jax.device_get(v))
    except Exception:  # noqa: BLE001 - non-numeric metric values are skipped, not fatal
        return None
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
        return None
    return float(arr.reshape(()))


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Host floats for every scalar metric (one device_get for the whole dict)."""
    host = jax.device_get(dict(metrics))
    out = {}
    for k, v in host.items():
        f = _scalar(v)
        if f is not None:
            out[k] = f
    return out


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
    """Raises NonFiniteError naming the step and the metric when one is NaN or infinite."""
    for name, value in to_floats(metrics).items():
        if not math.isfinite(value):
            raise NonFiniteError(
                f"step {step}: metric {name!r} is {value} (non-finite). Lower optim.lr, set "
                "optim.clip_norm, or check the data around this step; the last checkpoint "
                "holds the state before it."
            )


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


class _TBWriter:
    """Scalar summaries as TensorBoard event files (tensorboardX if present, else tensorboard)."""

    def __init__(self, logdir: str):
        self._impl = None
        try:
            from tensorboardX import SummaryWriter

            self._impl = ("x", SummaryWriter(logdir))
            return
        except ImportError:
            pass
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._impl = ("tb", EventFileWriter(logdir))
            self._pb = (event_pb2, summary_pb2)
        except ImportError:
            logging.warning("metrics: no tensorboardX/tensorboard; TensorBoard events are off.")

    def write(self, step: int, split: str, values: Mapping[str, float], wall: float):
        if self._impl is None:
            return
        kind, w = self._impl
        if kind == "x":
            for k, v in values.items():
                w.add_scalar(f"{split}/{k}", v, step, walltime=wall)
            return
        event_pb2, summary_pb2 = self._pb
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=v)
                   for k, v in values.items()]
        )  # fmt: skip
        w.add_event(event_pb2.Event(summary=summary, step=int(step), wall_time=wall))

    def flush(self):
        if self._impl is not None:
            self._impl[1].flush()

    def close(self):
        if self._impl is not None:
            self._impl[1].close()
            self._impl = None


class _RemoteLines:
    """An appended-to text file on an object store, which cannot append: the lines are kept
    and the object is rewritten whole, at most every `every_s` seconds and on flush/close."""

    def __init__(self, path, every_s: float = 30.0):
        self._path, self._every_s = path, every_s
        self._parts = [path.read_text()] if path.exists() else []  # a resumed run's lines
        self._dirty, self._last = False, 0.0

    def write(self, text: str) -> None:
        self._parts.append(text)
        self._dirty = True

    def flush(self, force: bool = False) -> None:
        if self._dirty and (force or time.time() - self._last >= self._every_s):
            self._path.write_text("".join(self._parts))
            self._dirty, self._last = False, time.time()

    def close(self) -> None:
        self.flush(force=True)


class MetricWriter:
    """Writes `WORKDIR/metrics.jsonl` lines and TensorBoard events under `WORKDIR/tb/`.

    Each line: `{"step": int, "split": str, "time": unix, <metric>: float, ...}`.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self.active:
            root = paths.workdir_path(workdir)
            root.mkdir(parents=True, exist_ok=True)
            if paths.is_url(root):
                self._jsonl = _RemoteLines(root / "metrics.jsonl")
            else:
                self._jsonl = open(root / "metrics.jsonl", "a")  # noqa: SIM115
            if tensorboard:
                try:
                    self._tb = _TBWriter(str(root / "tb"))
                except Exception as e:  # noqa: BLE001 - e.g. no filesystem for a URL scheme
                    logging.warning("metrics: TensorBoard events are off (%s).", e)

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict:
        """Writes one line; returns the host float values written."""
        values = to_floats(metrics)
        if not self.active:
            return values
        now = time.time()
        line = {"step": int(step), "split": split, "time": now, **values}
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.write(step, split, values, now)
        return values

    def flush(self):
        if isinstance(self._jsonl, _RemoteLines):
            self._jsonl.flush(force=True)
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# ---------------------------------------------------------------------------------------------
# Progress and timing
# ---------------------------------------------------------------------------------------------


class StepTimer:
    """Wall time and throughput between `lap` calls (first lap excludes compile via `reset`)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self._t0 = time.perf_counter()
        self._steps = 0
        self._tokens = 0

    def tick(self, tokens: int = 0):
        """Counts one step (and its tokens)."""
        self._steps += 1
        self._tokens += tokens

    def lap(self) -> dict[str, float]:
        """Returns {'steps_per_s', 'tokens_per_s', 'step_s'} since the last lap, and resets."""
        dt = max(time.perf_counter() - self._t0, 1e-9)
        out = {
            "steps_per_s": self._steps / dt,
            "tokens_per_s": self._tokens / dt,
            "step_s": dt / max(self._steps, 1),
        }
        self.reset()
        return out


class ProgressBar:
    """A tqdm bar over steps showing loss and tokens/s (silent on processes other than 0)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train"):
        self._bar = None
        if jax.process_index() == 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix):
        if self._bar is None:
            return
        self._bar.update(n)
        if postfix:
            self._bar.set_postfix(
                {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                refresh=False,
            )

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


# Which way a metric should move, from the words of its name. Per-group metrics
# ('exact_match/arithmetic') take the direction of their base name. The rightmost known word
# decides ('reward_loss' is a loss).
_HIGHER_PHRASES = ("exact_match", "win_rate", "tokens_per_s", "steps_per_s", "pass_at")
_LOWER_WORDS = {
    "loss", "ppl", "perplexity", "kl", "nll", "bpb", "bpc", "error", "err", "mse", "mae", "rmse",
    "wer", "cer",
    "forgetting", "s", "sec", "seconds", "latency", "memory", "bytes", "flops",
}  # fmt: skip
_HIGHER_WORDS = {
    "acc", "accuracy", "reward", "f1", "bleu", "rouge", "auc", "score", "precision", "recall",
    "correct", "agreement", "match", "win", "return", "em",
}  # fmt: skip


def metric_direction(name: str) -> int:
    """Which way a metric improves, read from its name.

    Args:
      name: a metric name such as 'loss', 'domain_ppl', 'exact_match/arithmetic', 'kl'.

    Returns:
      -1 when lower is better (loss, ppl, kl, error, seconds), +1 when higher is better
      (accuracy, exact_match, reward, win_rate, throughput), 0 when the name does not say.
    """
    base = name.split("/")[0].lower()
    if any(p in base for p in _HIGHER_PHRASES):
        return 1
    for word in reversed(re.split(r"[^a-z0-9]+", base)):
        if word in _LOWER_WORDS:
            return -1
        if word in _HIGHER_WORDS:
            return 1
    return 0


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def relative_change(before, after) -> str:
    """The change from `before` to `after` as text: a percentage, or a factor when it is large.

    '-25.0%' within a factor of 10; '÷8.84e+08' or '×25' beyond; '+0.8 (from 0)' when before is
    zero; a signed difference when the sign flips. '' when either value is not a finite number.
    """
    if not (_is_num(before) and _is_num(after)):
        return ""
    if after == before:
        return "0%"
    if before == 0:
        return f"{after:+.4g} (from 0)"
    ratio = after / before
    if ratio <= 0:  # the sign flipped: a ratio means nothing
        return f"{after - before:+.4g}"
    if ratio > 10:
        return f"×{ratio:.3g}"
    if ratio < 0.1:
        return f"÷{1 / ratio:.3g}"
    return f"{100 * (ratio - 1):+.1f}%"


def verdict(name: str, before, after) -> str:
    """'better' | 'worse' | 'same' | '' (direction unknown or values missing) for one metric."""
    direction = metric_direction(name)
    if not (direction and _is_num(before) and _is_num(after)):
        return ""
    if after == before:
        return "same"
    return "better" if (after - before) * direction > 0 else "worse"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"
    return str(v)


def format_table(
    before: Mapping[str, Any], after: Mapping[str, Any], saved_to: str | None = None
) -> str:
    """A plain-text table: metric | better | before | after | change, one row per metric.

    Args:
      before, after: metric values before and after training.
      saved_to: where the results were written (results.json); named on the first line.

    Returns:
      The table. `better` says which direction improves the metric (lower / higher, '?' when the
      name does not say); `change` is relative (see `relative_change`) followed by the verdict.
    """
    names = list(dict.fromkeys([*before.keys(), *after.keys()]))
    rows = [("metric", "better", "before", "after", "change")]
    for name in names:
        b, a = before.get(name), after.get(name)
        better = {1: "higher", -1: "lower"}.get(metric_direction(name), "?")
        change = " ".join(p for p in (relative_change(b, a), verdict(name, b, a)) if p)
        rows.append((name, better, _fmt(b), _fmt(a), change or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if saved_to:
        lines.insert(0, f"results saved in {saved_to}")
    return "\n".join(lines)
