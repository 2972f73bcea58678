"""Gururangan et al. 2020 ("Don't Stop Pretraining"), small: domain-adaptive pretraining (DAPT)
of the base model on the clinical corpus, then a clinical task, against no adaptation.

The task: classify a clinical term (e.g. 'hepatothrombitis') as DRUG / CONDITION / PROCEDURE
from the model's features (mean of the last hidden states over the term's tokens, linear probe
by logistic regression). Train and test terms are disjoint, so the probe must generalise from
what the representation knows about the domain's morphology. The base model saw only general
text; DAPT saw the terms in their slots ("the patient was given {DRUG} for {COND}").

    python experiments/dapt/run.py            # fft:tiny + configs/domain.py (full), 150 steps
    python experiments/dapt/run.py --quick    # fft:micro, minutes on a laptop

Writes OUT/dapt/ (the fft workdir), OUT/table.md and OUT/dapt.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import fft  # noqa: E402
from fft import config_lib, main  # noqa: E402
from fft.data.synthetic import World  # noqa: E402
from fft.data.synthetic.domains import MORPHEMES  # noqa: E402


def term_dataset(seed=0, train_frac=0.5):
    """[(term, class)] of the clinical domain, split into disjoint train / test terms."""
    world, rng = World(seed), random.Random(seed)
    terms = world._domains.terms["clinical"]
    data = [(t, c) for c, ts in terms.items() for t in ts]
    rng.shuffle(data)
    k = int(len(data) * train_frac)
    return data[:k], data[k:], sorted(MORPHEMES["clinical"][2])


def features(model, tokenizer, terms):
    """Mean last-layer hidden state over each term's tokens (after bos)."""
    import jax.numpy as jnp

    ids = [[tokenizer.bos_id] + tokenizer.encode(t) for t in terms]
    width = max(map(len, ids))
    tokens = np.zeros((len(ids), width), np.int32)
    seg = np.zeros((len(ids), width), np.int32)
    for i, x in enumerate(ids):
        tokens[i, : len(x)], seg[i, : len(x)] = x, 1
    hidden = np.asarray(model.hidden_states(jnp.asarray(tokens), None, jnp.asarray(seg)))
    mask = seg.astype(np.float32)
    mask[:, 0] = 0  # not the bos
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)


def probe_accuracy(source, train, test):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    model, tokenizer = fft.load(source)
    x_tr = features(model, tokenizer, [t for t, _ in train])
    x_te = features(model, tokenizer, [t for t, _ in test])
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(
        scaler.transform(x_tr), [c for _, c in train]
    )
    return float(clf.score(scaler.transform(x_te), [c for _, c in test]))


def main_(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--work", default=os.path.join(here, "work"), help="fft workdirs (git-ignored)")
    p.add_argument("--base", default="fft:tiny")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--quick", action="store_true", help="fft:micro, 60 steps, seq 64")
    args = p.parse_args(argv)
    c = config_lib.load_config(os.path.join(REPO, "configs/domain.py"), "full")
    c.init_from, c.steps, c.checkpoint_every = args.base, args.steps, 0
    if args.quick:
        c.init_from, c.steps, c.seq_len, c.optim.lr, c.optim.warmup_steps = (
            "fft:micro",
            60,
            64,
            3e-3,
            5,
        )
        c.domain.eval_docs = 60
    wd = os.path.join(args.work, "dapt")
    res = main.run_once(c, wd)
    train, test, classes = term_dataset()
    rows = {
        "no adaptation (base)": {
            "domain_ppl": res["before"]["domain_ppl"],
            "general_ppl": res["before"]["general_ppl"],
            "term_class_acc": probe_accuracy(c.init_from, train, test),
        },
        f"DAPT ({c.steps} steps, clinical + 25% general replay)": {
            "domain_ppl": res["after"]["domain_ppl"],
            "general_ppl": res["after"]["general_ppl"],
            "term_class_acc": probe_accuracy(wd, train, test),
        },
    }
    cols = ["domain_ppl", "general_ppl", "term_class_acc"]
    lines = ["| model | domain_ppl (per word) | general_ppl (per word) | term_class_acc |"]
    lines.append("|---|---|---|---|")
    for k, r in rows.items():
        lines.append(f"| {k} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")
    lines.append(f"\n{len(train)} train / {len(test)} test terms, {len(classes)} classes "
                 f"(chance {1 / len(classes):.3f}).")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 3.5))
    names = ["base", "DAPT"]
    ax[0].bar(names, [r["term_class_acc"] for r in rows.values()], color=["gray", "C0"])
    ax[0].axhline(1 / len(classes), ls="--", c="k", lw=0.8)
    ax[0].set(title="clinical term-class probe accuracy", ylim=(0, 1))
    ax[1].bar(names, [np.log(r["domain_ppl"]) for r in rows.values()], color=["gray", "C0"])
    ax[1].set(title="domain log ppl per word")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "dapt.png"), dpi=100)


if __name__ == "__main__":
    main_()
