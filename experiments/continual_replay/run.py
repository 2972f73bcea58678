"""Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train LLMs"), small.

Continual pre-training through the synthetic world's fact eras with re-warming + re-decaying
(optim.schedule='rewarm', one cycle per era) and 0 / 1 / 5 / 25 % replay of earlier eras,
against a "joint" baseline trained once on all eras' data shuffled together (same steps, one
warmup-cosine cycle). Forgetting = fact loss on era 0's held-out text at the end minus right
after era 0; final loss = mean held-out fact loss over all eras at the end.

    python experiments/continual_replay/run.py                 # fft:tiny, 4 eras x 100 steps
    python experiments/continual_replay/run.py --quick         # fft:micro, minutes on a laptop

Writes OUT/<variant>/ (fft workdirs), OUT/table.md and OUT/forgetting.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from fft import config_lib, main  # noqa: E402
from fft.data.synthetic import World  # noqa: E402


def base_config(args):
    c = config_lib.load_config(os.path.join(REPO, "configs/continual.py"))
    c.init_from = args.base
    c.continual.eras = args.eras
    c.steps = args.eras * args.steps_per_era
    c.continual.general = 0.0  # replay here is of earlier eras only (the paper's setting)
    c.continual.docs_per_era = args.docs_per_era
    c.continual.eval_docs = args.eval_docs
    c.continual.fact_eval = args.fact_eval
    c.checkpoint_every = 0  # only the final one
    if args.quick:
        c.batch_size, c.seq_len, c.optim.lr, c.optim.warmup_steps = 8, 64, 3e-3, 2
    return c


def write_joint_stream(directory, args):
    """All eras' documents shuffled together, cut into the same number of 'era' shard groups."""
    world, rng = World(0), random.Random(0)
    docs = [t for e in range(args.eras) for t in world.fact_corpus(e, args.docs_per_era)]
    rng.shuffle(docs)
    os.makedirs(directory, exist_ok=True)
    per = len(docs) // args.eras
    for e in range(args.eras):
        with open(os.path.join(directory, f"era{e:02d}-00000.jsonl"), "w") as f:
            for t in docs[e * per : (e + 1) * per]:
                f.write(json.dumps({"text": t}) + "\n")


def summarize(eras_rows, n):
    last, first = eras_rows[str(n - 1)], eras_rows["0"]
    losses = [last[f"fact_loss/era{e}"] for e in range(n)]
    return {
        "final_fact_loss": sum(losses) / n,
        "forgetting_era0": last["fact_loss/era0"] - first["fact_loss/era0"],
        "current_fact_acc": last["current_fact_acc"],
        "past_fact_acc": last.get("past_fact_acc", float("nan")),
        "general_ppl": last["general_ppl"],
    }


def main_(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--work", default=os.path.join(here, "work"), help="fft workdirs (git-ignored)")
    p.add_argument("--base", default="fft:tiny")
    p.add_argument("--eras", type=int, default=4)
    p.add_argument("--steps_per_era", type=int, default=100)
    p.add_argument("--docs_per_era", type=int, default=2000)
    p.add_argument("--eval_docs", type=int, default=100)
    p.add_argument("--fact_eval", default="score")
    p.add_argument("--replay", default="0,0.01,0.05,0.25")
    p.add_argument("--quick", action="store_true", help="fft:micro, 4 x 25 steps, seq 64")
    args = p.parse_args(argv)
    if args.quick:
        args.base, args.steps_per_era, args.docs_per_era, args.eval_docs = "fft:micro", 25, 400, 40
    rows = {}
    for r in [float(x) for x in args.replay.split(",")]:
        name = f"rewarm_replay{int(round(r * 100))}"
        c = base_config(args)
        c.continual.replay = r
        wd = os.path.join(args.work, name)
        rows[name] = main.run_once(c, wd)["eras"]
    # Joint baseline: one pass over all eras' data shuffled, one warmup-cosine cycle.
    c = base_config(args)
    c.continual.replay = 0.0
    c.optim.schedule = "warmup_cosine"
    c.continual.stream_dir = os.path.join(args.work, "joint_stream")
    write_joint_stream(c.continual.stream_dir, args)
    wd = os.path.join(args.work, "joint")
    rows["joint (all data, 1 cycle)"] = main.run_once(c, wd)["eras"]

    summary = {k: summarize(v, args.eras) for k, v in rows.items()}
    cols = [
        "final_fact_loss",
        "forgetting_era0",
        "current_fact_acc",
        "past_fact_acc",
        "general_ppl",
    ]
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, s in summary.items():
        lines.append(f"| {k} | " + " | ".join(f"{s[c]:.3f}" for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "summary": summary, "eras": rows}, f, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for k, v in rows.items():
        xs = list(range(args.eras))
        ax[0].plot(xs, [v[str(e)]["fact_loss/era0"] for e in xs], marker="o", label=k)
        ax[1].plot(xs, [v[str(e)][f"fact_loss/era{e}"] for e in xs], marker="o", label=k)
    ax[0].set(title="era-0 held-out fact loss (forgetting)", xlabel="end of era", ylabel="loss")
    ax[1].set(title="current era's held-out fact loss", xlabel="end of era", ylabel="loss")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "forgetting.png"), dpi=100)


if __name__ == "__main__":
    main_()
