"""LoRA vs full fine-tuning on the synthetic instruction suite (Hu et al., 2021, at small scale).

    python experiments/lora_vs_full/run.py                       # fft:tiny, the default recipe
    python experiments/lora_vs_full/run.py --base=fft:micro --steps=80 --out=/tmp/lvf \
        --extra='--config.instruction.eval_examples=150'   # minutes

Runs `configs/instruction.py` once with every weight trainable and once per LoRA rank (4, 8, 16;
adapters on every linear layer, alpha = 2 * rank), each in its own process (so peak memory is
per run), then writes into --out:
  results.json   one row per run
  results.md     the table: exact match before/after, trainable params, train-state memory,
                 tokens/s, peak memory, wall time
  loss.png       train loss of every run (fft.report.plot_runs)
  exact_match.png  held-out exact match and response ppl against trainable parameters

Train-state memory counts what the optimizer keeps: every weight (f32) plus AdamW's two moments
for the trainable ones only, which is where LoRA saves: (total + 2 * trainable) * 4 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)  # run from a checkout without installing


def run_one(name: str, workdir: str, args, overrides: list[str]) -> dict:
    """Trains one setting through the CLI (resumes if the workdir already finished)."""
    if not os.path.exists(os.path.join(workdir, "results.json")):
        cmd = [
            sys.executable,
            "-m",
            "fft.main",
            f"--config={os.path.join(REPO, 'configs', 'instruction.py')}:{args.variant_of(name)}",
            f"--workdir={workdir}",
            f"--config.init_from={args.base}",
            *overrides,
        ]
        if args.steps:
            cmd.append(f"--config.steps={args.steps}")
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def tokens_per_s(workdir: str) -> float:
    """Mean train tokens/s, leaving out the first logged interval (it holds the compile)."""
    values = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if m.get("split") == "train" and "tokens_per_s" in m:
                values.append(m["tokens_per_s"])
    values = values[1:] or values
    return sum(values) / max(len(values), 1)


def row(name: str, workdir: str, results: dict) -> dict:
    cost = results["cost"]
    return {
        "run": name,
        "exact_match_before": results["before"].get("exact_match"),
        "exact_match_after": results["after"].get("exact_match"),
        "ppl_after": results["after"].get("ppl"),
        "trainable_params": cost["trainable_params"],
        "total_params": cost["total_params"],
        "train_state_mb": (cost["total_params"] + 2 * cost["trainable_params"]) * 4 / 2**20,
        "tokens_per_s": tokens_per_s(workdir),
        "peak_memory_mb": cost["peak_memory_bytes"] / 2**20,
        "wall_s": results["wall_s"],
        "workdir": workdir,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| run | exact match before | exact match after | response ppl after | trainable params "
        "| share | train state (MB) | tokens/s | peak RSS (MB) | wall (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['run']} | {r['exact_match_before']:.3f} | {r['exact_match_after']:.3f} | "
        f"{r['ppl_after']:.2f} | "
        f"{r['trainable_params']:,} | {100 * r['trainable_params'] / r['total_params']:.2f}% | "
        f"{r['train_state_mb']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_memory_mb']:.0f} | "
        f"{r['wall_s']:.0f} |\n"
        for r in rows
    )
    return head + body


def plots(rows: list[dict], out: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fft import report

    report.plot_runs([r["workdir"] for r in rows], "loss", os.path.join(out, "loss.png"),
                     split="train", title="train loss (response tokens)")  # fmt: skip
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate(
        [
            ("exact_match_after", "held-out exact match (after)"),
            ("ppl_after", "response ppl (after)"),
        ]
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        for r in rows:
            ax.scatter(r["trainable_params"], r[key], s=40)
            ax.annotate(r["run"], (r["trainable_params"], r[key]),
                        textcoords="offset points", xytext=(5, 5))  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("LoRA vs full fine-tuning")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "exact_match.png"), dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", default="fft:tiny", help="init_from of every run")
    p.add_argument("--steps", type=int, default=0, help="steps per run (0 = the config's)")
    p.add_argument("--ranks", default="4,8,16", help="LoRA ranks")
    p.add_argument("--out", default=os.path.join(HERE, "runs"), help="output directory")
    p.add_argument("--extra", default="", help="more overrides: '--config.x=1 --config.y=2'")
    args = p.parse_args()
    args.variant_of = lambda name: "full" if name == "full" else "lora"
    os.makedirs(args.out, exist_ok=True)

    settings = [("full", [])] + [
        (f"lora r={r}", [f"--config.lora.rank={r}", f"--config.lora.alpha={2.0 * int(r)}"])
        for r in args.ranks.split(",")
    ]
    rows = []
    for name, overrides in settings:
        workdir = os.path.join(args.out, name.replace(" ", "_").replace("=", ""))
        results = run_one(name, workdir, args, overrides + shlex.split(args.extra))
        rows.append(row(name, workdir, results))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"base": args.base, "steps": args.steps, "rows": rows}, f, indent=2)
    md = table(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    plots(rows, args.out)
    print(md)


if __name__ == "__main__":
    main()
