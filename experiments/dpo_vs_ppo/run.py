"""The reward-versus-KL frontier of PPO and DPO (Rafailov et al., 2023, Fig. 2) from one start
model, on controlled sentiment generation (the paper's task) or the synthetic instruction tasks.

    python experiments/dpo_vs_ppo/run.py --task=sentiment                  # from fft:tiny
    python experiments/dpo_vs_ppo/run.py --sft=runs/instruction            # ~1 h on 2 CPUs
    python experiments/dpo_vs_ppo/run.py --smoke --out=/tmp/dvp            # fft:micro, minutes

Every run starts from the same model (`--sft`: an instruction-method workdir, or fft:tiny for
`--task=sentiment`) and is scored on the same held-out prompts: true reward = the judge's score
of greedy answers, KL = KL(policy || start) per sequence on sampled answers (k1, summed over the
answer; `fft.rl.evals`). One point per run (and one per intermediate eval when `--eval_every`
> 0):

  PPO   configs/rlhf.py, fixed KL penalty `rlhf.kl_coef` in --kl_coefs, rewarded by the judge
        (the paper's "PPO-GT": the ground-truth reward), or by a reward model (--ppo_reward=DIR)
  DPO   configs/dpo.py, `dpo.beta` in --betas, on pairs from the judge's noisy rankings

Writes into --out: results.json, results.md (the table) and frontier.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)  # run from a checkout without installing


def run_one(name: str, variant: str, workdir: str, overrides: dict) -> dict:
    """Runs configs/<name>.py:<variant> with dotted overrides, or reads its finished results."""
    from fft import config_lib
    from fft import main as fft_main

    path = f"{REPO}/configs/{name}.py"
    config = config_lib.load_config(path, variant, cast=True, **overrides)
    if not os.path.exists(os.path.join(workdir, "results.json")):
        print(f"== {name}:{variant} -> {workdir}  {overrides}", flush=True)
    return fft_main.run_once(config, workdir)


def eval_points(workdir: str) -> list[dict]:
    """Intermediate (step, true_reward, kl) evals of a run (metrics.jsonl, split 'eval')."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [m for m in map(json.loads, f) if m.get("split") == "eval"]
    return [m for m in lines if "true_reward" in m and "kl" in m]


def table(rows: list[dict], start: dict) -> str:
    def sampled(m):
        return f"{m['true_reward_sampled']:.3f}" if "true_reward_sampled" in m else "–"

    out = (
        "| method | coefficient | true reward (greedy) | true reward (samples) | win rate vs start "
        "| KL to start (nats/seq) | answer tokens | wall (s) |\n|---|---|---|---|---|---|---|---|\n"
        f"| start | – | {start['true_reward']:.3f} | {sampled(start)} | 0.500 | 0.00 | "
        f"{start['response_len']:.1f} | – |\n"
    )
    for r in rows:
        a = r["after"]
        out += (
            f"| {r['method']} | {r['coef_name']}={r['coef']:g} | {a['true_reward']:.3f} | "
            f"{sampled(a)} | {a['win_rate']:.3f} | {a['kl']:.2f} | {a['response_len']:.1f} | "
            f"{r['wall_s']:.0f} |\n"
        )
    return out


def plot(rows: list[dict], start: dict, out: str, key: str = "true_reward") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"PPO": "tab:blue", "DPO": "tab:red"}
    for method, color in colors.items():
        mine = [r for r in rows if r["method"] == method]
        for r in mine:  # intermediate evals: small, the final point: large and labelled
            pts = r["points"]
            ax.scatter(
                [p["kl"] for p in pts],
                [p[key] for p in pts],
                s=10,
                color=color,
                alpha=0.35,
            )
            ax.annotate(
                f"{r['coef_name']}={r['coef']:g}",
                (r["after"]["kl"], r["after"][key]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        ax.scatter(
            [r["after"]["kl"] for r in mine],
            [r["after"][key] for r in mine],
            s=45,
            color=color,
            label=method,
        )
    ax.scatter([0.0], [start[key]], marker="*", s=120, color="black", label="start")
    ax.set_xlabel("KL(policy || start), nats per sequence")
    what = "samples" if key == "true_reward_sampled" else "greedy answers"
    ax.set_ylabel(f"true reward (judge, {what})")
    ax.set_title("reward vs KL: PPO and DPO from one start model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)


def main() -> None:
    from fft import config_lib

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--task",
        default="instructions",
        choices=("instructions", "sentiment"),
        help="instructions: the instruction tasks from an SFT run; sentiment: controlled "
        "sentiment generation (continue review openings; fft.rl.tasks 'reviews') from fft:tiny",
    )
    p.add_argument("--sft", default=None, help="start: SFT workdir (instructions) or fft:tiny")
    p.add_argument("--out", default=os.path.join(HERE, "runs"), help="output directory")
    p.add_argument("--smoke", action="store_true", help="smoke variants (fft:micro, a few steps)")
    p.add_argument("--kl_coefs", default="0.02,0.1,0.5", help="PPO fixed KL coefficients")
    p.add_argument("--betas", default="0.05,0.1,0.5", help="DPO betas")
    p.add_argument("--ppo_reward", default="judge", help="'judge' or a reward-model workdir")
    p.add_argument("--eval_every", type=int, default=0, help="intermediate evals (more points)")
    p.add_argument("--ppo", default="", help="more rlhf overrides 'steps=96,optim.lr=1e-4'")
    p.add_argument("--dpo", default="", help="more dpo overrides 'steps=200'")
    args = p.parse_args()
    sentiment = args.task == "sentiment"
    variant = "smoke" if args.smoke else ("sentiment" if sentiment else "")
    sft = args.sft or ("fft:tiny" if sentiment else os.path.join(REPO, "runs", "instruction"))
    os.makedirs(args.out, exist_ok=True)
    if not sft.startswith("fft:"):
        sft = os.path.abspath(sft)
        if not os.path.exists(os.path.join(sft, "results.json")):
            sys.exit(f"--sft={args.sft}: not a finished run (no results.json)")
    start = {"init_from": sft, "eval_every": args.eval_every}
    prompts = "reviews" if sentiment else "instructions"

    settings = []
    for k in args.kl_coefs.split(","):
        over = {
            "rlhf.kl_controller": "fixed",
            "rlhf.kl_coef": float(k),
            "rlhf.reward": args.ppo_reward,
            "rlhf.prompts": prompts,
        } | config_lib.parse_overrides(args.ppo)
        settings.append(("PPO", "rlhf", "kl_coef", float(k), over))
    for b in args.betas.split(","):
        settings.append(
            (
                "DPO",
                "dpo",
                "beta",
                float(b),
                {"dpo.beta": float(b), "dpo.prompts": prompts}
                | config_lib.parse_overrides(args.dpo),
            )
        )
    rows, sft_eval = [], None
    for method, config, coef_name, coef, over in settings:
        workdir = os.path.join(args.out, f"{method.lower()}_{coef_name}{coef:g}")
        results = run_one(config, variant, workdir, start | over)
        if method == "PPO" and sft_eval is None:
            sft_eval = results["before"]  # the SFT model under the same evaluation
        points = [results["before"]] + eval_points(workdir) + [results["after"]]
        rows.append(
            {
                "method": method,
                "coef_name": coef_name,
                "coef": coef,
                "workdir": workdir,
                "after": results["after"],
                "wall_s": results["wall_s"],
                "points": points,
            }
        )
    sft_eval = sft_eval or rows[0]["points"][0]
    md = table(rows, sft_eval)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"sft": sft, "task": args.task, "start": sft_eval, "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    # Greedy continuations of review openings degenerate ("very very very"): score samples.
    plot(rows, sft_eval, args.out, "true_reward_sampled" if sentiment else "true_reward")
    print(md)


if __name__ == "__main__":
    main()
