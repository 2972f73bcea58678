"""Run reports: one self-contained HTML page (plus its PNGs) for one run or several compared.

    python -m fft.report WORKDIR [--out report.html] [--watch 30]
    python -m fft.report A B C --out cmp.html          # comparison: one table, overlaid curves

Reads what a run leaves in its workdir (`metrics.jsonl`, `results.json`, `samples.jsonl`,
`config.json`). The page opens on a summary: the before/after table (each change coloured by
whether it improves the metric: lower is better for loss/ppl/kl, higher for accuracy,
exact_match, reward, win_rate; see `fft.metrics.metric_direction`), the cost block and the wall
time. Then the training curves (train loss with the eval points overlaid), eval metrics over
steps when a run evaluated more than twice (otherwise one grouped before/after bar chart), for
RLHF the reward/KL curves and the rollout/update time split, and every sample with its reference
and correctness, filterable by task. A live run works too: a torn last metrics line and a
missing results.json are expected and shown as "running". Several workdirs share one table and
overlay their curves (one colour per run); the experiments use `plot_runs` for their plots.

The page embeds its plots as base64 PNGs and carries a CSP that allows nothing but those images
and its own style (the task filter is CSS only): sample generations are model text, escaped, and
must never run. PNG file names are made safe from any metric name, and a plot that fails to
render is named on the page instead of stopping the report.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fft.config_lib import FFTError
from fft.metrics import metric_direction, relative_change, verdict

_SKIP_KEYS = {"step", "split", "time"}
_EVAL_SPLITS = ("eval_before", "eval", "eval_after")  # one "eval" series in the plots
_TRAIN_PANELS = {"lr": "learning rate", "grad_norm": "gradient norm", "tokens_per_s": "tokens / s"}
_SMOOTH = {"loss", "reward", "true_reward", "tokens_per_s"}  # noisy: faint raw + an EMA line
_RL_KEYS = ("reward", "true_reward", "kl", "rollout_s", "update_s")


# --------------------------------------------------------------------------------------------
# Reading a workdir
# --------------------------------------------------------------------------------------------


def _read_jsonl(path: str) -> list[dict]:
    """JSONL records; unparsable lines (a live run's half-written last line) are skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out


def read_metrics(workdir: str) -> list[dict]:
    """The records of `WORKDIR/metrics.jsonl` that have a step (missing file: [])."""
    records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return [r for r in records if isinstance(r.get("step"), int | float)]


def read_results(workdir: str) -> dict | None:
    """`WORKDIR/results.json`, or None while the run is still going (absent or half-written)."""
    try:
        with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return results if isinstance(results, dict) else None


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def series(records: Sequence[dict], metric: str, split: str | Sequence[str] | None = None):
    """(steps, values) of one metric, in step order, over the records of a split (or several).

    Args:
      records: metrics.jsonl records.
      metric: the metric key.
      split: one split name, several (one series, e.g. `_EVAL_SPLITS`), or None for all.
    """
    splits = {split} if isinstance(split, str) else None if split is None else set(split)
    points = sorted(
        (r["step"], r[metric])
        for r in records
        if _is_num(r.get(metric)) and (splits is None or r.get("split") in splits)
    )
    return [p[0] for p in points], [p[1] for p in points]


def _metric_names(records: Sequence[dict], splits: Sequence[str]) -> list[str]:
    names: dict[str, None] = {}
    for r in records:
        if r.get("split") in splits:
            names.update({k: None for k, v in r.items() if k not in _SKIP_KEYS and _is_num(v)})
    return list(names)


class Run:
    """What one workdir holds, read once."""

    def __init__(self, workdir: str):
        if not os.path.isdir(workdir):
            raise FFTError(f"{workdir!r}: no such run directory.")
        self.workdir = workdir
        self.name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
        self.metrics = read_metrics(workdir)
        self.results = read_results(workdir)
        self.samples = _read_jsonl(os.path.join(workdir, "samples.jsonl"))
        try:
            with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
                self.config = json.load(f)
        except (OSError, json.JSONDecodeError):
            self.config = (self.results or {}).get("config") or {}
        if not isinstance(self.config, dict):
            self.config = {}
        self.splits = list(dict.fromkeys(str(r.get("split", "train")) for r in self.metrics))

    @property
    def live(self) -> bool:
        return self.results is None

    @property
    def results_path(self) -> str:
        return os.path.join(os.path.abspath(self.workdir), "results.json")


def _runs(workdirs) -> list[Run]:
    runs = [w if isinstance(w, Run) else Run(w) for w in workdirs]
    names = [r.name for r in runs]
    for r in runs:  # two runs called 'run' in different parents: show the parent too
        if names.count(r.name) > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(r.workdir)))
            r.name = f"{parent}/{r.name}"
    return runs


def _group(split: str) -> str:
    """The plotted series a split belongs to: eval_before / eval / eval_after are one."""
    return "eval" if split in _EVAL_SPLITS else split


def _splits_of(group: str) -> tuple[str, ...]:
    return _EVAL_SPLITS if group == "eval" else (group,)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """A file-name-safe form of a plot or metric name ('exact_match/arithmetic' -> 'exact_
    match_arithmetic'): letters, digits, '.', '_' and '-' only, never empty or hidden."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "plot"


def _ema(values: Sequence[float], alpha: float) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def _draw(ax, runs: Sequence[Run], lines: Sequence[tuple[str, str, str]]) -> int:
    """Draws curves; `lines` holds (metric, split group, legend tag). Returns #lines drawn.

    One run: a colour per line. Several runs: a colour per run and a line style per line. Train
    and rollout lines are solid; eval lines are dashed with a marker on every eval point. The
    legend always names the run.
    """
    drawn = 0
    for c, run in enumerate(runs):
        for m, (metric, group, tag) in enumerate(lines):
            steps, values = series(run.metrics, metric, _splits_of(group))
            if not steps:
                continue
            is_eval = group not in ("train", "rollout")
            color = f"C{(m if len(runs) == 1 else c) % 10}"
            style = "--" if is_eval else "-"
            if len(runs) > 1 and len(lines) > 1 and not is_eval:
                style = ["-", "--", ":", "-."][m % 4]
            label = " ".join(p for p in (run.name, tag) if p)
            if len(steps) > 50 and metric in _SMOOTH and not is_eval:
                ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=0.8)
                values = _ema(values, 0.9)
            marker = "o" if is_eval or len(steps) < 30 and group != "train" else None
            ax.plot(steps, values, style, color=color, marker=marker, ms=4, label=label)
            drawn += 1
    return drawn


def _png(
    draw: Callable, title: str, ylabel: str, size=(6.4, 3.6), xlabel="step", left=0.13
) -> bytes | None:
    """Renders one axes with `draw(ax) -> lines drawn`; None when there was nothing to draw."""
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    # Fixed margins: constrained layout would double the render time of every plot.
    h = size[1]
    fig.subplots_adjust(left=left, right=0.97, top=1 - 0.35 / h, bottom=0.5 / h)
    ax = fig.add_subplot()
    if not draw(ax):
        return None
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_runs(
    workdirs: Sequence[str],
    metric: str | Sequence[str],
    out_png: str,
    *,
    split: str | None = None,
    title: str | None = None,
) -> str:
    """Plots one metric (or several on one axes) over steps for several runs, overlaid.

    Args:
      workdirs: run directories (each with a metrics.jsonl).
      metric: a metrics.jsonl key such as 'loss', or a list of keys to share the axes.
      out_png: where to write the PNG.
      split: 'train' | 'eval' (with eval_before / eval_after) | 'rollout' | None (every split
        that has the metric; train solid, eval dashed with markers).
      title: plot title (default: the metric names).

    Returns:
      out_png.

    Raises:
      FFTError: no run has the metric.
    """
    metrics = [metric] if isinstance(metric, str) else list(metric)
    runs = _runs(workdirs)
    groups = [split] if split else list(dict.fromkeys(_group(s) for r in runs for s in r.splits))
    lines = [
        (
            m,
            g,
            " ".join(p for p in (m if len(metrics) > 1 else "", g if len(groups) > 1 else "") if p),
        )
        for m in metrics
        for g in groups
    ]
    png = _png(lambda ax: _draw(ax, runs, lines), title or ", ".join(metrics), ", ".join(metrics))
    if png is None:
        raise FFTError(f"no run in {list(workdirs)} has metric {metrics} (split={split!r}).")
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    with open(out_png, "wb") as f:
        f.write(png)
    return out_png


def _time_split_png(runs: Sequence[Run]) -> bytes | None:
    """RLHF wall time per run: rollout vs update seconds, summed over steps (stacked bars)."""
    totals = []
    for run in runs:
        rollout = sum(series(run.metrics, "rollout_s")[1])
        update = sum(series(run.metrics, "update_s")[1])
        if rollout or update:
            totals.append((run.name, rollout, update))
    if not totals:
        return None

    def draw(ax):
        names = [t[0] for t in totals]
        ax.barh(names, [t[1] for t in totals], color="C0", label="rollout")
        ax.barh(
            names, [t[2] for t in totals], left=[t[1] for t in totals], color="C1", label="update"
        )
        for y, (_, r, u) in enumerate(totals):
            ax.text(r + u, y, f"  {100 * r / (r + u):.0f}% rollout", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.3 * max(r + u for _, r, u in totals))  # room for the labels
        return len(totals)

    size = (6.4, 1.4 + 0.5 * len(totals))
    left = min(0.45, 0.06 + 0.013 * max(len(t[0]) for t in totals))  # room for the run names
    return _png(draw, "time split (sum over steps)", "", size=size, xlabel="seconds", left=left)


def _eval_points(runs: Sequence[Run], metric: str) -> int:
    """The most eval steps any run has for a metric (before, during and after training)."""
    return max((len(set(series(r.metrics, metric, _EVAL_SPLITS)[0])) for r in runs), default=0)


def _before_after(run: Run, metric: str) -> tuple[float | None, float | None]:
    """A metric's first and last eval values (after is None with a single eval point)."""
    values = series(run.metrics, metric, _EVAL_SPLITS)[1]
    if not values:
        return None, None
    return values[0], (values[-1] if len(values) > 1 else None)


def _bars_png(runs: Sequence[Run], metrics: Sequence[str]) -> bytes | None:
    """One grouped horizontal bar chart of eval metrics on a 0..1 scale, before vs after.

    Each metric is a row; each run has a light 'before' bar and a solid 'after' bar.
    """
    if not metrics:
        return None
    n_runs = len(runs)
    height = 0.8 / (2 * n_runs)

    def draw(ax):
        drawn = 0
        for c, run in enumerate(runs):
            for k, (when, alpha, hatch) in enumerate((("before", 0.35, "//"), ("after", 1.0, ""))):
                ys, xs = [], []
                for y, metric in enumerate(metrics):
                    v = _before_after(run, metric)[k]
                    if v is not None:
                        ys.append(y - 0.4 + height * (2 * c + k + 0.5))
                        xs.append(v)
                if not xs:
                    continue
                label = f"{run.name} {when}" if n_runs > 1 else when
                ax.barh(ys, xs, height=height * 0.95, color=f"C{c % 10}", alpha=alpha,
                        hatch=hatch, edgecolor=f"C{c % 10}", label=label)  # fmt: skip
                for y, x in zip(ys, xs, strict=True):
                    ax.text(x, y, f" {x:.3g}", va="center", fontsize=7)
                drawn += 1
        ax.set_yticks(range(len(metrics)), metrics, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.12)
        return drawn

    size = (6.4, 1.0 + 0.32 * len(metrics) * max(1.0, 0.7 * n_runs))
    left = min(0.42, 0.05 + 0.0125 * max(len(m) for m in metrics))
    title = "eval before / after" + (" (first and last eval)" if n_runs == 1 else "")
    return _png(draw, title, "", size=size, xlabel="value", left=left)


Figure_ = tuple[str, str, bytes | None, str]  # (section, name, png or None, error)


def _figures(runs: Sequence[Run]) -> list[Figure_]:
    """(section, name, png, error) for every plot the runs have data for.

    A plot that raises is kept with png None and the error, so the page still gets written and
    names what failed.
    """
    figs: list[Figure_] = []

    def attempt(section, name, make):
        try:
            png = make()
        except Exception as e:  # noqa: BLE001 - one bad plot must not lose the whole report
            figs.append((section, name, None, f"{type(e).__name__}: {e}"))
            return
        if png is not None:
            figs.append((section, name, png, ""))

    def add(section, name, lines, title, ylabel):
        attempt(section, name, lambda: _png(lambda ax: _draw(ax, runs, lines), title, ylabel))

    def names(group):
        return dict.fromkeys(n for r in runs for n in _metric_names(r.metrics, _splits_of(group)))

    add("Training", "loss", [("loss", "train", "train"), ("loss", "eval", "eval")], "loss", "loss")
    for metric, ylabel in _TRAIN_PANELS.items():
        add("Training", metric, [(metric, "train", "")], ylabel, ylabel)

    # Eval metrics: curves (one plot per base name, a line per task) when a run evaluated more
    # than twice; otherwise the before/after values go into one grouped bar chart.
    curves: dict[str, list[str]] = {}
    bars = []
    for metric in names("eval"):
        if _eval_points(runs, metric) > 2:
            if metric != "loss":  # already on the loss plot
                curves.setdefault(metric.split("/")[0], []).append(metric)
        elif all(0 <= v <= 1 for r in runs for v in series(r.metrics, metric, _EVAL_SPLITS)[1]):
            bars.append(metric)  # a 0..1 metric (accuracy-like); the rest is in the table
    attempt("Evaluation", "eval_before_after", lambda: _bars_png(runs, bars))
    for base, metrics in curves.items():
        lines = [(m, "eval", m.split("/", 1)[1] if "/" in m else "") for m in metrics]
        add("Evaluation", f"eval_{base}", lines, f"{base} (eval)", base)

    rl = "rollout"
    add("RLHF", "reward", [("reward", rl, "reward"), ("true_reward", rl, "true reward")],
        "reward model score / true reward", "reward")  # fmt: skip
    add("RLHF", "kl", [("kl", rl, "")], "KL(policy || reference)", "KL (nats)")
    add("RLHF", "step_time", [("rollout_s", rl, "rollout"), ("update_s", rl, "update")],
        "seconds per step", "seconds")  # fmt: skip
    attempt("RLHF", "time_split", lambda: _time_split_png(runs))
    for metric in names(rl):
        if metric not in _RL_KEYS:
            add("RLHF", metric, [(metric, rl, "")], metric, metric)
    for split in dict.fromkeys(_group(s) for r in runs for s in r.splits):
        if split in ("train", "eval", "rollout"):
            continue
        for metric in names(split):
            if max(len(series(r.metrics, metric, split)[0]) for r in runs) > 2:
                add(split, f"{split}_{metric}", [(metric, split, "")], f"{metric} ({split})",
                    metric)  # fmt: skip
    return figs


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2430;
background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:12px 28px}header h1{margin:0;font-size:18px}
header p{margin:3px 0 0;color:#c9d1dc;font-size:13px}header b{color:#fff}
main{max-width:1320px;margin:0 auto;padding:4px 28px 40px}
h2{font-size:16px;margin:22px 0 10px;border-bottom:1px solid #d8dde6;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px}
.summary{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #d8dde6;border-radius:8px;padding:6px}
figure img{width:100%;height:auto;display:block}
table{border-collapse:collapse;background:#fff;margin:0 0 10px}
th,td{border:1px solid #d8dde6;padding:3px 10px;text-align:right;vertical-align:top}
th{background:#eef2f8}td.l,th.l{text-align:left}th.sub{font-weight:normal;color:#475467;
padding-left:22px}
.better{color:#1a7f37;font-weight:600}.worse{color:#b42318;font-weight:600}
.same,.dir{color:#667085}.best{font-weight:700;text-decoration:underline}
.live{color:#b7791f;font-weight:600}.err{color:#b42318}
td.text{text-align:left;white-space:pre-wrap;font:12px/1.4 ui-monospace,Menlo,monospace;
max-width:420px;overflow-wrap:anywhere}
td.ok{background:#ecfdf3}td.bad{background:#fef3f2}
.mark{font:600 12px system-ui,sans-serif;display:block;margin-top:2px}
td.ok .mark{color:#1a7f37}td.bad .mark{color:#b42318}
.filters{margin:4px 0 8px;display:flex;flex-wrap:wrap;gap:6px;align-items:center}
.filters input{position:absolute;opacity:0;width:1px;height:1px}
.filters label{border:1px solid #d8dde6;border-radius:14px;padding:1px 10px;background:#fff;
cursor:pointer;font-size:12px}.filters input:checked+label{background:#2f6fde;color:#fff;
border-color:#2f6fde}.filters input:focus-visible+label{outline:2px solid #2f6fde}
.filters .sep{color:#98a2b3;margin:0 4px}
details pre{background:#fff;border:1px solid #d8dde6;padding:10px;overflow:auto;font-size:12px}
.muted{color:#667085}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'"


def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return html.escape(str(v))
    if isinstance(v, int) or float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.4g}"


def _si(v, unit="") -> str:
    if not _is_num(v):
        return "–" if v is None else html.escape(str(v))
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g} {suffix}{unit}"
    return f"{v:.4g} {unit}".strip()


def _bytes(v) -> str:
    if not _is_num(v):
        return "–"
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if v >= div:
            return f"{v / div:.3g} {suffix}"
    return f"{int(v)} B"


def _duration(s) -> str:
    if not _is_num(s):
        return "–"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def _status(run: Run) -> str:
    steps = max((r["step"] for r in run.metrics), default=0)
    target = run.config.get("steps")
    of = f" / {target}" if isinstance(target, int) else ""
    method = (run.results or {}).get("method") or run.config.get("method") or "?"
    if run.live:
        path = os.path.join(run.workdir, "metrics.jsonl")
        ago = (
            f", last update {time.time() - os.path.getmtime(path):.0f} s ago"
            if os.path.exists(path)
            else ""
        )
        state = f'<span class="live">running</span>{ago}'
    else:
        wall = run.results.get("wall_s")
        state = "finished" + (f" in {_duration(wall)}" if _is_num(wall) else "")
    return f"<b>{html.escape(run.name)}</b>: {html.escape(str(method))}, step {steps}{of}, {state}"


def _direction_cell(metric: str) -> str:
    d = metric_direction(metric)
    if not d:
        return '<td class="dir" title="direction unknown">?</td>'
    word = "higher" if d > 0 else "lower"
    return f'<td class="dir" title="{word} is better">{"↑" if d > 0 else "↓"} {word}</td>'


def _metric_cell(metric: str) -> str:
    if "/" in metric:  # a per-task row under its overall metric
        base, rest = metric.split("/", 1)
        return f'<th class="l sub" title="{html.escape(metric)}">{html.escape(rest)}</th>'
    return f'<th class="l">{html.escape(metric)}</th>'


def _ordered(metrics: Sequence[str]) -> list[str]:
    """Overall metrics first, each followed by its per-task rows ('exact_match/<task>')."""
    bases = list(dict.fromkeys(m.split("/")[0] for m in metrics))
    out = []
    for base in bases:
        out += [m for m in metrics if m == base]
        out += sorted(m for m in metrics if m.startswith(base + "/"))
    return out


def _results_table(runs: Sequence[Run]) -> str:
    """The before/after table: one column group per finished run, changes coloured."""
    done = [r for r in runs if r.results]
    if not done:
        return '<p class="muted">No results.json yet (the run is still going).</p>'
    metrics = _ordered(
        list(
            dict.fromkeys(
                k for r in done for p in ("before", "after") for k in r.results.get(p) or {}
            )
        )
    )
    if not metrics:
        return '<p class="muted">results.json holds no before/after metrics.</p>'
    several = len(done) > 1
    head = "".join(f'<th colspan="3">{html.escape(r.name)}</th>' for r in done)
    sub = "<th>before</th><th>after</th><th>change</th>" * len(done)
    rows = []
    for m in metrics:
        afters = [(r.results.get("after") or {}).get(m) for r in done]
        best = None
        d = metric_direction(m)
        nums = [a for a in afters if _is_num(a)]
        if several and d and len(set(nums)) > 1:
            best = max(nums) if d > 0 else min(nums)
        cells = []
        for r, a in zip(done, afters, strict=True):
            b = (r.results.get("before") or {}).get(m)
            v = verdict(m, b, a)
            change = relative_change(b, a)
            title = f' title="{v}"' if v else ""
            delta = f'<span class="{v}"{title}>{html.escape(change)}</span>' if change else ""
            after = "" if a is None else _fmt(a)
            if best is not None and a == best:
                after = f'<span class="best" title="best of the runs">{after}</span>'
            cells.append(f"<td>{'' if b is None else _fmt(b)}</td><td>{after}</td><td>{delta}</td>")
        rows.append(f"<tr>{_metric_cell(m)}{_direction_cell(m)}{''.join(cells)}</tr>")
    if several:
        top = f'<tr><th class="l" rowspan="2">metric</th><th rowspan="2">better</th>{head}</tr>'
        top += f"<tr>{sub}</tr>"
    else:
        top = f'<tr><th class="l">metric</th><th>better</th>{sub}</tr>'
    return f'<table id="results">{top}{"".join(rows)}</table>'


def _cost_table(runs: Sequence[Run]) -> str:
    done = [r for r in runs if r.results]
    if not done:
        return ""

    def cost(r):
        c = r.results.get("cost")
        return c if isinstance(c, dict) else {}

    rows = {
        "steps": lambda r: _fmt(r.results.get("steps", "–")),
        "wall time": lambda r: _duration(r.results.get("wall_s")),
        "tokens": lambda r: _si(cost(r).get("tokens")),
        "train FLOPs": lambda r: _si(cost(r).get("train_flops"), "FLOP"),
        "trainable params": lambda r: _si(cost(r).get("trainable_params")),
        "total params": lambda r: _si(cost(r).get("total_params")),
        "trainable share": lambda r: _share(cost(r)),
        "peak memory": lambda r: _bytes(cost(r).get("peak_memory_bytes")),
    }
    known = {"tokens", "train_flops", "trainable_params", "total_params", "peak_memory_bytes"}
    for key in dict.fromkeys(k for r in done for k in cost(r) if k not in known):
        rows[key] = lambda r, k=key: _fmt(cost(r).get(k, "–"))
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in done)
    body = ""
    for name, fn in rows.items():
        cells = "".join(f"<td>{fn(r)}</td>" for r in done)
        body += f'<tr><th class="l">{html.escape(name)}</th>{cells}</tr>'
    return f'<table id="cost"><tr><th class="l">cost</th>{head}</tr>{body}</table>'


def _share(cost: dict) -> str:
    t, n = cost.get("trainable_params"), cost.get("total_params")
    return f"{100 * t / n:.3g}%" if _is_num(t) and _is_num(n) and n else "–"


def _summary(runs: Sequence[Run]) -> str:
    """The first screen: results table and cost block side by side, where results were saved."""
    saved = "".join(
        f"<p class='muted'>{html.escape(r.name)}: results saved in "
        f"<code>{html.escape(r.results_path)}</code></p>"
        for r in runs
        if r.results
    )
    live = [r.name for r in runs if r.live]
    note = (
        f"<p class='muted'>still running (no results.json yet): {html.escape(', '.join(live))}</p>"
        if live and len(live) < len(runs)
        else ""
    )
    return (
        f'<section id="summary"><h2>Summary</h2><div class="summary">{_results_table(runs)}'
        f"{_cost_table(runs)}</div>{note}{saved}</section>"
    )


def _sample_rows(run: Run) -> tuple[list[int | float], list[dict]]:
    """The steps that have samples and one row per prompt: {prompt, reference, task, by_step}."""
    steps = sorted({s["step"] for s in run.samples if _is_num(s.get("step"))})
    rows: dict[tuple, dict] = {}
    for s in run.samples:
        if not _is_num(s.get("step")):
            continue
        task = s.get("group", s.get("task"))
        key = (str(s.get("prompt", "")), str(s.get("reference", "")), str(task))
        row = rows.setdefault(
            key, {"prompt": key[0], "reference": s.get("reference"), "task": task, "by_step": {}}
        )
        row["by_step"].setdefault(s["step"], s)
    return steps, list(rows.values())


def _samples(runs: Sequence[Run]) -> str:
    """Every sample: prompt, reference, then each step's response marked right or wrong.

    A row per prompt; the chips above a table filter it by task and by correctness at the last
    step, with CSS only (radio buttons and `:checked ~` rules; the CSP allows no script).
    """
    parts, rules = [], []
    for n, run in enumerate(runs):
        steps, rows = _sample_rows(run)
        if not rows:
            continue
        tasks = list(dict.fromkeys(str(r["task"]) for r in rows if r["task"] is not None))
        task_ids = {t: f"t{i}" for i, t in enumerate(tasks)}
        last = steps[-1]
        head = "".join(
            f"<th class='l'>step {_fmt(st)}{_score([r['by_step'].get(st) for r in rows])}</th>"
            for st in steps
        )
        body = []
        for r in rows:
            cls = ["s", task_ids.get(str(r["task"]), "tnone")]
            final = r["by_step"].get(last, {}).get("correct")
            cls.append("ok" if final is True else "bad" if final is False else "")
            cells = [
                f"<td class='l'>{html.escape(str(r['task'] or '–'))}</td>",
                f"<td class='text'>{html.escape(r['prompt'])}</td>",
                f"<td class='text'>{html.escape(str(r['reference'] or ''))}</td>",
            ]
            for st in steps:
                cells.append(_response_cell(r["by_step"].get(st)))
            body.append(f"<tr class='{' '.join(c for c in cls if c)}'>{''.join(cells)}</tr>")
        pid = f"f{n}"
        chips = [_chip(f"{pid}t", f"{pid}-all", f"all tasks ({len(rows)})", checked=True)]
        for t, tid in task_ids.items():
            count = sum(str(r["task"]) == t for r in rows)
            chips.append(_chip(f"{pid}t", f"{pid}-{tid}", f"{t} ({count})"))
            rules.append(f"#{pid}-{tid}:checked~table tr.s:not(.{tid}){{display:none}}")
        chips.append("<span class='sep'>|</span>")
        chips.append(_chip(f"{pid}c", f"{pid}-any", "right and wrong", checked=True))
        chips.append(_chip(f"{pid}c", f"{pid}-ok", "right at the last step"))
        chips.append(_chip(f"{pid}c", f"{pid}-bad", "wrong at the last step"))
        rules.append(f"#{pid}-ok:checked~table tr.s:not(.ok){{display:none}}")
        rules.append(f"#{pid}-bad:checked~table tr.s:not(.bad){{display:none}}")
        title = f"<h3>{html.escape(run.name)}</h3>" if len(runs) > 1 else ""
        parts.append(
            f"{title}<div class='filters'>{''.join(chips)}"
            f"<table class='samples'><tr><th class='l'>task</th><th class='l'>prompt</th>"
            f"<th class='l'>reference</th>{head}</tr>{''.join(body)}</table></div>"
        )
    if not parts:
        return ""
    return f"<style>{''.join(rules)}</style><h2 id='samples'>Samples</h2>{''.join(parts)}"


def _chip(group: str, ident: str, text: str, checked: bool = False) -> str:
    on = " checked" if checked else ""
    return (
        f"<input type='radio' name='{group}' id='{ident}'{on}>"
        f"<label for='{ident}'>{html.escape(text)}</label>"
    )


def _score(samples: Sequence[dict | None]) -> str:
    marks = [s.get("correct") for s in samples if s is not None]
    marks = [m for m in marks if isinstance(m, bool)]
    return f" <span class='muted'>({sum(marks)}/{len(marks)} right)</span>" if marks else ""


def _response_cell(s: dict | None) -> str:
    if s is None:
        return "<td></td>"
    text = html.escape(str(s.get("response", "")))
    correct = s.get("correct")
    if not isinstance(correct, bool):
        return f"<td class='text'>{text}</td>"
    cls, mark = ("ok", "✓ right") if correct else ("bad", "✗ wrong")
    return f"<td class='text {cls}'>{text}<span class='mark'>{mark}</span></td>"


def render_html(runs: Sequence[Run], figs: Sequence[Figure_], refresh: int = 0) -> str:
    """The report page: summary first, then plots by section, samples, configs."""
    sections: dict[str, list[str]] = {}
    for section, name, png, error in figs:
        if png is None:
            item = f'<p class="err">plot {html.escape(name)} failed: {html.escape(error)}</p>'
        else:
            data = base64.b64encode(png).decode("ascii")
            item = f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
            item += "</figure>"
        sections.setdefault(section, []).append(item)
    plots = "".join(
        f"<h2>{html.escape(s)}</h2><div class='grid'>{''.join(f)}</div>"
        for s, f in sections.items()
    )
    if not figs:
        plots = '<p class="muted">No metrics yet.</p>'
    configs = "".join(
        f"<details><summary>config of {html.escape(r.name)}</summary>"
        f"<pre>{html.escape(json.dumps(r.config, indent=2, sort_keys=True, default=str))}</pre>"
        "</details>"
        for r in runs
        if r.config
    )
    meta_refresh = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    kind = "fft comparison" if len(runs) > 1 else "fft report"
    title = f"{kind}: " + ", ".join(r.name for r in runs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">{meta_refresh}
<title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><header><h1>{html.escape(title)}</h1>
{"".join(f"<p>{_status(r)}</p>" for r in runs)}
<p>generated {time.strftime("%Y-%m-%d %H:%M:%S")}</p></header>
<main>{_summary(runs)}{plots}{_samples(runs)}
{"<h2>Config</h2>" + configs if configs else ""}</main></body></html>
"""


def _write_pngs(figs: Sequence[Figure_], out_dir: str, stem: str) -> None:
    """Writes `<stem>_<safe plot name>.png` for every plot; a failed write is only a warning."""
    used: set[str] = set()
    for _, name, png, _ in figs:
        if png is None:
            continue
        base = f"{stem}_{safe_name(name)}"
        fname, i = base, 1
        while fname in used:  # 'a/b' and 'a_b' must not overwrite each other
            fname, i = f"{base}_{i}", i + 1
        used.add(fname)
        try:
            with open(os.path.join(out_dir, fname + ".png"), "wb") as f:
                f.write(png)
        except OSError as e:
            print(f"fft.report: warning: could not write {fname}.png: {e}", file=sys.stderr)


def build_report(workdirs: Sequence[str], out: str | None = None, refresh: int = 0) -> str:
    """Writes the HTML report and its PNGs (`<stem>_<plot>.png` beside it).

    Args:
      workdirs: one or more run directories (several: a comparison page).
      out: the HTML path (default: WORKDIR/report.html for one run, ./report.html for several).
      refresh: if > 0, the page reloads itself every `refresh` seconds (live runs).

    Returns:
      The HTML path.
    """
    if not workdirs:
        raise FFTError("give at least one run directory.")
    workdirs, out = [os.fspath(w) for w in workdirs], os.fspath(out) if out else None
    out = out or (os.path.join(workdirs[0], "report.html") if len(workdirs) == 1 else "report.html")
    runs = _runs(workdirs)
    figs = _figures(runs)
    for _, name, png, error in figs:
        if png is None:
            print(f"fft.report: warning: plot {name} failed: {error}", file=sys.stderr)
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = out + ".tmp"  # a browser reloading a live report never sees half a page
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render_html(runs, figs, refresh))
    os.replace(tmp, out)
    _write_pngs(figs, out_dir, os.path.splitext(os.path.basename(out))[0])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fft.report WORKDIR [WORKDIR ...] [--out report.html] [--watch SECONDS]`."""
    p = argparse.ArgumentParser(prog="python -m fft.report", description=__doc__.split("\n")[0])
    p.add_argument("workdirs", nargs="+", help="run directories; several overlay their curves")
    p.add_argument("--out", default=None, help="HTML path (PNGs are written beside it)")
    p.add_argument("--watch", type=int, default=0, help="rebuild every N seconds until all finish")
    args = p.parse_args(argv)
    try:
        while True:
            live = any(read_results(w) is None for w in args.workdirs)
            out = build_report(args.workdirs, args.out, refresh=args.watch if live else 0)
            print(f"fft.report: wrote {out}", flush=True)
            if not args.watch or not live:
                return 0
            time.sleep(args.watch)
    except FFTError as e:
        print(f"fft.report: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
