"""InstructGPT at small scale (Ouyang et al., 2022): SFT -> reward model -> PPO, end to end.

    python -m fft.main --config=configs/instruction.py --workdir=runs/instruction  # SFT
    python experiments/instructgpt/run.py --sft=runs/instruction         # ~25 min, 2 CPUs
    python experiments/instructgpt/run.py --smoke --out=/tmp/igpt        # fft:micro, minutes

Stages, each started from the one before and each scored on the same held-out prompts by the
synthetic world's judge (the "human" whose noisy rankings trained the reward model):

  base        the pretrained model the SFT run started from (its config.json's init_from)
  SFT         the instruction-tuned model (`--sft`; trained here with configs/instruction.py
              when the directory has no results.json)
  RM          configs/reward.py from the SFT model: held-out pairwise accuracy of the reward model
  PPO (RM)    configs/rlhf.py from the SFT model against that reward model: the InstructGPT path
  PPO (judge) (--oracle) the same PPO against the judge itself: the ceiling of a perfect RM

Columns: true reward (judge score of greedy answers), win rate against the SFT model's greedy
answers (ties count half), KL(policy || SFT) per sequence on sampled answers, the reward model's
score, mean answer length in tokens. Writes into --out: results.json, results.md (the table),
ppo_curves.png (true reward, reward-model reward and KL per rollout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)  # run from a checkout without installing


def get_config(name: str, variant: str, overrides: dict):
    """configs/<name>.py:<variant> with dotted-key overrides (strings cast to the field's type)."""
    from fft import config_lib

    return config_lib.load_config(f"{REPO}/configs/{name}.py", variant, cast=True, **overrides)


def run_stage(name: str, variant: str, workdir: str, overrides: dict) -> dict:
    """Runs one stage through fft.main.run, or reads its results.json when it already finished."""
    from fft import main as fft_main

    config = get_config(name, variant, overrides)
    if not os.path.exists(os.path.join(workdir, "results.json")):
        print(f"== {name}:{variant} -> {workdir}  {overrides}", flush=True)
    return fft_main.run_once(config, workdir)


def evaluate_base(base: str, sft: str, ppo_config) -> dict:
    """The pretrained base under the PPO run's evaluation (same prompts, judge and SFT opponent)."""
    import fft
    from fft.data.synthetic import World
    from fft.rl import evals, rewards
    from fft.rl import tasks as tasks_lib

    c = ppo_config.rlhf
    world = World(c.world_seed)
    tasks = [t.strip() for t in c.tasks.split(",") if t.strip()] or None
    records = world.instruction_data("test", c.eval_prompts, tasks)
    base_model, tokenizer = fft.load(base)
    sft_model, _ = fft.load(sft)
    evaluate = evals.make_evaluate(
        records,
        "instruction",
        tokenizer,
        prompt_len=ppo_config.seq_len - c.max_new_tokens,
        max_new_tokens=c.max_new_tokens,
        ref_model=sft_model,
        true_reward_fn=rewards.code_reward_fn(tasks_lib.REWARDS["instructions"][1]),
        seed=ppo_config.seed + 1,
    )
    return evaluate(base_model)


def table(rows: list[dict]) -> str:
    def f(x, fmt=".3f"):
        return "–" if x is None else format(x, fmt)

    out = (
        "| stage | true reward | win rate vs SFT | KL to SFT (nats/seq) | RM score | answer tokens "
        "| other | wall (s) |\n|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        out += (
            f"| {r['stage']} | {f(r.get('true_reward'))} | {f(r.get('win_rate'))} | "
            f"{f(r.get('kl'), '.2f')} | {f(r.get('reward'))} | {f(r.get('response_len'), '.1f')} "
            f"| {r.get('other', '')} | {f(r.get('wall_s'), '.0f')} |\n"
        )
    return out


def plot(ppo_dirs: dict, out: str) -> None:
    """True reward, reward-model reward and KL per rollout of the PPO runs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    FigureCanvasAgg(fig)
    panels = [
        ("true_reward", "true (judge) reward"),
        ("reward", "training reward"),
        ("kl", "KL to SFT (nats / sequence)"),
    ]
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    for label, workdir in ppo_dirs.items():
        with open(os.path.join(workdir, "metrics.jsonl")) as fh:
            lines = [m for m in map(json.loads, fh) if m.get("split") == "train"]
        steps = [m["step"] for m in lines]
        for ax, (key, _) in zip(axes, panels, strict=True):
            ax.plot(steps, [m.get(key, float("nan")) for m in lines], label=label)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("PPO optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("PPO from the SFT model: per-rollout means over sampled answers")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ppo_curves.png"), dpi=110)


def main() -> None:
    from fft import config_lib

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sft", default=os.path.join(REPO, "runs", "instruction"), help="SFT workdir")
    p.add_argument("--out", default=os.path.join(HERE, "runs"), help="output directory")
    p.add_argument("--smoke", action="store_true", help="smoke variants (fft:micro, a few steps)")
    p.add_argument("--oracle", action="store_true", help="also PPO against the judge itself")
    p.add_argument("--reward", default="", help="reward overrides 'steps=200,optim.lr=3e-4'")
    p.add_argument("--ppo", default="", help="rlhf overrides 'steps=96,rlhf.kl_coef=0.02'")
    args = p.parse_args()
    variant = "smoke" if args.smoke else ""
    os.makedirs(args.out, exist_ok=True)
    sft = os.path.abspath(args.sft)

    sft_results = run_stage("instruction", variant, sft, {})
    base = sft_results["config"]["init_from"]
    start = {"init_from": sft}
    rm_dir, ppo_dir = os.path.join(args.out, "reward"), os.path.join(args.out, "ppo_rm")
    rm = run_stage("reward", variant, rm_dir, start | config_lib.parse_overrides(args.reward))
    ppo_over = start | config_lib.parse_overrides(args.ppo)
    ppo = run_stage("rlhf", variant, ppo_dir, ppo_over | {"rlhf.reward": rm_dir})
    ppo_dirs = {"PPO (RM)": ppo_dir}
    oracle = None
    if args.oracle:
        ppo_dirs["PPO (judge)"] = os.path.join(args.out, "ppo_judge")
        oracle = run_stage(
            "rlhf", variant, ppo_dirs["PPO (judge)"], ppo_over | {"rlhf.reward": "judge"}
        )
    base_eval = evaluate_base(base, sft, get_config("rlhf", variant, ppo_over))

    sft_em = sft_results["after"].get("exact_match")
    rows = [
        {
            "stage": f"base ({os.path.basename(base.rstrip('/'))})",
            **base_eval,
            "other": f"exact match {sft_results['before'].get('exact_match', 0):.3f}",
        },
        {
            "stage": "SFT",
            **ppo["before"],
            "other": f"exact match {sft_em:.3f}",
            "wall_s": sft_results["wall_s"],
        },
        {
            "stage": "reward model",
            "wall_s": rm["wall_s"],
            "other": f"pairwise acc {rm['before']['pairwise_accuracy']:.3f} -> "
            f"{rm['after']['pairwise_accuracy']:.3f}",
        },
        {"stage": "PPO (RM)", **ppo["after"], "wall_s": ppo["wall_s"]},
    ]
    if oracle:
        rows.append({"stage": "PPO (judge)", **oracle["after"], "wall_s": oracle["wall_s"]})
    md = table(rows)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"sft": sft, "base": base, "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    plot(ppo_dirs, args.out)
    print(md)


if __name__ == "__main__":
    main()
