"""Run reports: one self-contained HTML page (plus its PNGs) for one run or several overlaid.

    python -m fft.report WORKDIR [WORKDIR ...] [--out report.html] [--watch 30]

Reads what a run leaves in its workdir (`metrics.jsonl`, `results.json`, `samples.jsonl`,
`config.json`) and draws loss and learning-rate curves, eval metrics over steps, the before/after
table and cost block, sample generations, and for RLHF the reward/KL curves and the rollout/update
time split. A live run works too: a torn last metrics line and a missing results.json are expected
and shown as "running". Several workdirs overlay their curves (one colour per run), which is what
the experiments use for their plots through `plot_runs`.

The page embeds its plots as base64 PNGs and carries a CSP that allows nothing but those images
and its own style: sample generations are model text, escaped, and must never run.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fft.config_lib import FFTError

_SKIP_KEYS = {"step", "split", "time"}
_SPLIT_STYLE = {"train": "-", "eval": "--", "rollout": "-"}
_TRAIN_PANELS = ("loss", "lr", "grad_norm", "tokens_per_s")
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


def series(records: Sequence[dict], metric: str, split: str | None = None):
    """(steps, values) of one metric, in step order, over the records of one split (or all)."""
    points = sorted(
        (r["step"], r[metric])
        for r in records
        if _is_num(r.get(metric)) and (split is None or r.get("split") == split)
    )
    return [p[0] for p in points], [p[1] for p in points]


def _metric_names(records: Sequence[dict], split: str) -> list[str]:
    names: dict[str, None] = {}
    for r in records:
        if r.get("split") == split:
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
        self.splits = list(dict.fromkeys(str(r.get("split", "train")) for r in self.metrics))

    @property
    def live(self) -> bool:
        return self.results is None


def _runs(workdirs) -> list[Run]:
    runs = [w if isinstance(w, Run) else Run(w) for w in workdirs]
    names = [r.name for r in runs]
    for r in runs:  # two runs called 'run' in different parents: show the parent too
        if names.count(r.name) > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(r.workdir)))
            r.name = f"{parent}/{r.name}"
    return runs


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _ema(values: Sequence[float], alpha: float) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def _draw(ax, runs: Sequence[Run], metrics: Sequence[str], splits: Sequence[str] | None) -> int:
    """Draws metric curves: a colour per run, a line style per metric or split. Returns #lines."""
    lines = 0
    for c, run in enumerate(runs):
        for m, metric in enumerate(metrics):
            for split in splits or run.splits:
                steps, values = series(run.metrics, metric, split)
                if not steps:
                    continue
                parts = [run.name if len(runs) > 1 else "", metric if len(metrics) > 1 else ""]
                parts.append(f"({split})" if not splits or len(splits) > 1 else "")
                label = " ".join(p for p in parts if p)
                style = (
                    _SPLIT_STYLE.get(split, ":") if len(metrics) == 1 else ["-", "--", ":"][m % 3]
                )
                color = f"C{c % 10}"
                marker = "o" if len(steps) < 30 and split != "train" else None
                if len(steps) > 50 and metric in _SMOOTH:
                    ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=0.8)
                    values = _ema(values, 0.9)
                ax.plot(steps, values, style, color=color, marker=marker, ms=3, label=label or None)
                lines += 1
    return lines


def _png(
    draw: Callable, title: str, ylabel: str = "", size=(6.4, 3.6), xlabel="step", left=0.13
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
    if ylabel:
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
      split: 'train' | 'eval' | 'rollout' | None (every split that has the metric; train solid,
        eval dashed).
      title: plot title (default: the metric names).

    Returns:
      out_png.

    Raises:
      FFTError: no run has the metric.
    """
    metrics = [metric] if isinstance(metric, str) else list(metric)
    runs = _runs(workdirs)
    png = _png(
        lambda ax: _draw(ax, runs, metrics, [split] if split else None), title or ", ".join(metrics)
    )
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
    return _png(draw, "time split (sum over steps)", size=size, xlabel="seconds", left=left)


def _figures(runs: Sequence[Run]) -> list[tuple[str, str, bytes]]:
    """(section, name, png) for every plot the runs have data for."""
    figs: list[tuple[str, str, bytes]] = []

    def add(section, name, metrics, splits, title, ylabel=""):
        png = _png(lambda ax: _draw(ax, runs, metrics, splits), title, ylabel)
        if png is not None:
            figs.append((section, name, png))

    def names(split):
        return dict.fromkeys(n for r in runs for n in _metric_names(r.metrics, split))

    add("Training", "loss", ["loss"], ["train", "eval"], "loss")
    for metric in _TRAIN_PANELS[1:]:
        add("Training", metric, [metric], ["train"], metric)
    for metric in names("eval"):
        if metric != "loss":  # already on the loss plot, dashed
            add("Evaluation", metric, [metric], ["eval"], metric)
    rl = ["rollout"]
    add("RLHF", "reward", ["reward", "true_reward"], rl, "reward model score / true reward")
    add("RLHF", "kl", ["kl"], rl, "KL(policy || reference)")
    add("RLHF", "step_time", ["rollout_s", "update_s"], rl, "seconds per step", "s")
    time_split = _time_split_png(runs)
    if time_split is not None:
        figs.append(("RLHF", "time_split", time_split))
    for metric in names("rollout"):
        if metric not in _RL_KEYS:
            add("RLHF", metric, [metric], rl, metric)
    for split in dict.fromkeys(s for r in runs for s in r.splits):
        if split not in ("train", "eval", "rollout"):
            for metric in names(split):
                add(split, f"{split}_{metric}", [metric], [split], f"{metric} ({split})")
    return figs


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2430;
background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:14px 28px}header h1{margin:0;font-size:18px}
header p{margin:4px 0 0;color:#aab4c3;font-size:13px}
main{max-width:1320px;margin:0 auto;padding:8px 28px 40px}
h2{font-size:16px;margin:26px 0 10px;border-bottom:1px solid #d8dde6;padding-bottom:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #d8dde6;border-radius:8px;padding:6px}
figure img{width:100%;height:auto;display:block}
table{border-collapse:collapse;background:#fff;margin:0 0 10px}
th,td{border:1px solid #d8dde6;padding:4px 10px;text-align:right;vertical-align:top}
th{background:#eef2f8}td.l,th.l{text-align:left}
.up{color:#1a7f37}.down{color:#b42318}.live{color:#b7791f;font-weight:600}
td.text{text-align:left;white-space:pre-wrap;font:12px/1.4 ui-monospace,Menlo,monospace;
max-width:560px;overflow-wrap:anywhere}
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


def _status(run: Run) -> str:
    steps = max((r["step"] for r in run.metrics), default=0)
    target = run.config.get("steps") if isinstance(run.config, dict) else None
    of = f" / {target}" if isinstance(target, int) else ""
    method = (run.results or {}).get("method") or (run.config or {}).get("method") or "?"
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
        state = "finished" + (f" in {wall:.0f} s" if _is_num(wall) else "")
    return f"<b>{html.escape(run.name)}</b>: {html.escape(str(method))}, step {steps}{of}, {state}"


def _results_table(runs: Sequence[Run]) -> str:
    done = [r for r in runs if r.results]
    if not done:
        return '<p class="muted">No results.json yet (the run is still going).</p>'
    metrics = list(
        dict.fromkeys(k for r in done for p in ("before", "after") for k in r.results.get(p) or {})
    )
    head = "".join(f'<th colspan="3">{html.escape(r.name)}</th>' for r in done)
    sub = "<th>before</th><th>after</th><th>change</th>" * len(done)
    rows = []
    for m in metrics:
        cells = []
        for r in done:
            b, a = (r.results.get("before") or {}).get(m), (r.results.get("after") or {}).get(m)
            delta = ""
            if _is_num(a) and _is_num(b):
                cls = "up" if a > b else "down" if a < b else ""
                delta = f'<span class="{cls}">{a - b:+.4g}</span>'
            shown = ["" if v is None else _fmt(v) for v in (b, a)] + [delta]
            cells.append("".join(f"<td>{c}</td>" for c in shown))
        rows.append(f'<tr><th class="l">{html.escape(m)}</th>{"".join(cells)}</tr>')
    return (
        f'<table><tr><th class="l" rowspan="2">metric</th>{head}</tr><tr>{sub}</tr>'
        + "".join(rows)
        + "</table>"
    )


def _cost_table(runs: Sequence[Run]) -> str:
    done = [r for r in runs if r.results and isinstance(r.results.get("cost"), dict)]
    if not done:
        return ""
    rows = {
        "steps": lambda r: _fmt(r.results.get("steps", "–")),
        "wall time": lambda r: _si(r.results.get("wall_s"), "s"),
        "tokens": lambda r: _si(r.results["cost"].get("tokens")),
        "train FLOPs": lambda r: _si(r.results["cost"].get("train_flops"), "FLOP"),
        "trainable params": lambda r: _si(r.results["cost"].get("trainable_params")),
        "total params": lambda r: _si(r.results["cost"].get("total_params")),
        "trainable share": lambda r: _share(r.results["cost"]),
        "peak memory": lambda r: _bytes(r.results["cost"].get("peak_memory_bytes")),
    }
    known = {"tokens", "train_flops", "trainable_params", "total_params", "peak_memory_bytes"}
    for key in dict.fromkeys(k for r in done for k in r.results["cost"] if k not in known):
        rows[key] = lambda r, k=key: _fmt(r.results["cost"].get(k, "–"))
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in done)
    body = ""
    for name, fn in rows.items():
        cells = "".join(f"<td>{fn(r)}</td>" for r in done)
        body += f'<tr><th class="l">{html.escape(name)}</th>{cells}</tr>'

    return f'<h2>Cost</h2><table><tr><th class="l"></th>{head}</tr>{body}</table>'


def _share(cost: dict) -> str:
    t, n = cost.get("trainable_params"), cost.get("total_params")
    return f"{100 * t / n:.3g}%" if _is_num(t) and _is_num(n) and n else "–"


def _samples(runs: Sequence[Run], per_step: int = 4) -> str:
    """The first and the last step's samples of each run (escaped model text)."""
    parts = []
    for run in runs:
        steps = sorted({s.get("step") for s in run.samples if _is_num(s.get("step"))})
        if not steps:
            continue
        rows = []
        for step in dict.fromkeys([steps[0], steps[-1]]):
            picked = [s for s in run.samples if s.get("step") == step][:per_step]
            for s in picked:
                prompt = html.escape(str(s.get("prompt", "")))
                response = html.escape(str(s.get("response", "")))
                rows.append(
                    f"<tr><td>{_fmt(step)}</td><td class='text'>{prompt}</td>"
                    f"<td class='text'>{response}</td></tr>"
                )
        parts.append(
            f"<h3>{html.escape(run.name)}</h3><table><tr><th>step</th><th class='l'>prompt</th>"
            f"<th class='l'>response</th></tr>{''.join(rows)}</table>"
        )
    return "<h2>Samples</h2>" + "".join(parts) if parts else ""


def render_html(
    runs: Sequence[Run], figs: Sequence[tuple[str, str, bytes]], refresh: int = 0
) -> str:
    """The report page: status, plots by section, results, cost, samples, configs."""
    sections: dict[str, list[str]] = {}
    for section, name, png in figs:
        data = base64.b64encode(png).decode("ascii")
        sections.setdefault(section, []).append(
            f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></figure>'
        )
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
    title = "fft report: " + ", ".join(r.name for r in runs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">{meta_refresh}
<title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><header><h1>{html.escape(title)}</h1>
{"".join(f"<p>{_status(r)}</p>" for r in runs)}
<p>generated {time.strftime("%Y-%m-%d %H:%M:%S")}</p></header>
<main>{plots}<h2>Results</h2>{_results_table(runs)}{_cost_table(runs)}{_samples(runs)}
{"<h2>Config</h2>" + configs if configs else ""}</main></body></html>
"""


def build_report(workdirs: Sequence[str], out: str | None = None, refresh: int = 0) -> str:
    """Writes the HTML report and its PNGs (`<stem>_<plot>.png` beside it).

    Args:
      workdirs: one or more run directories.
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
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(out))[0]
    for _, name, png in figs:
        with open(os.path.join(out_dir, f"{stem}_{name}.png"), "wb") as f:
            f.write(png)
    tmp = out + ".tmp"  # a browser reloading a live report never sees half a page
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render_html(runs, figs, refresh))
    os.replace(tmp, out)
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
