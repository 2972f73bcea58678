"""Classification and regression metrics for sequence classifiers (transfer learning).

Pure numpy metric functions (hand-checkable) plus `evaluate`, which runs a model over a list
of Batches and returns a flat `{metric: float}` dict, the shape the train loop writes into
`metrics.jsonl` and `results.json`. The confusion matrix travels in that flat dict as
`cm/<true>/<pred>` counts; `confusion_from_metrics` turns it back into a matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flax import nnx

from fft import sharding

TASKS = ("classification", "multilabel", "regression")

# ---------------------------------------------------------------------------------------------
# Metric functions (numpy in, float / array out)
# ---------------------------------------------------------------------------------------------


def accuracy(y_true, y_pred) -> float:
    """Fraction of exact matches: mean_i [y_true_i == y_pred_i] (rows must match whole for
    multi-label [N, C] inputs, i.e. subset accuracy). 0.0 for empty input."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape[0] == 0:
        return 0.0
    eq = y_true == y_pred
    if eq.ndim > 1:
        eq = eq.all(axis=tuple(range(1, eq.ndim)))
    return float(eq.mean())


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Counts `cm[t, p]` of examples with true class t predicted as p; int64 [C, C]."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def f1_per_class(cm: np.ndarray) -> np.ndarray:
    """F1 of each class from a confusion matrix: 2 tp / (2 tp + fp + fn) (0 where undefined)."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)


def macro_f1(y_true, y_pred, n_classes: int) -> float:
    """Unweighted mean over classes of F1 (sklearn's `f1_score(average='macro')`)."""
    return float(f1_per_class(confusion_matrix(y_true, y_pred, n_classes)).mean())


def multilabel_macro_f1(y_true_nc, y_pred_nc) -> float:
    """Mean over labels of the binary F1 of each label column ([N, C] 0/1 arrays)."""
    t, p = np.asarray(y_true_nc) > 0.5, np.asarray(y_pred_nc) > 0.5
    tp = (t & p).sum(0).astype(np.float64)
    denom = 2 * tp + (~t & p).sum(0) + (t & ~p).sum(0)
    return float(np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0).mean())


# ---------------------------------------------------------------------------------------------
# Running a model
# ---------------------------------------------------------------------------------------------


@nnx.jit
def _forward(model, tokens, positions, segment_ids):
    return model(tokens, positions, segment_ids)


def predict(model, batches: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Head outputs and labels of every real row of `batches`.

    Args:
      model: `model(tokens, positions, segment_ids) -> [B, n_out]` (a SequenceClassifier).
      batches: Batches with `labels`; all-padding rows (segment_ids all 0) are dropped.

    Returns:
      `(outputs [N, n_out] float32, labels [N] or [N, C])`.
    """
    outs, labels = [], []
    for batch in batches:
        real = np.asarray(batch["segment_ids"]).sum(axis=1) > 0
        fields = sharding.put_like(
            [batch["tokens"], batch["positions"], batch["segment_ids"]], nnx.state(model)
        )
        out = _forward(model, *fields)
        outs.append(np.asarray(sharding.to_host(out), np.float32)[real])
        labels.append(np.asarray(batch["labels"])[real])
    return np.concatenate(outs), np.concatenate(labels)


def metrics_from_outputs(
    outputs: np.ndarray, labels: np.ndarray, task: str, label_names: Sequence[str] = ()
) -> dict[str, float]:
    """The metric dict of a task from head outputs and labels.

    classification: `loss` (mean cross-entropy), `accuracy`, `macro_f1`, `cm/<true>/<pred>`.
    multilabel: `loss` (mean sigmoid BCE), `accuracy` (subset), `macro_f1` (over labels),
      `label_accuracy` (per label-decision).
    regression: `loss` (= `mse`), `mse`, `mae`, `pearson`.
    """
    outputs = np.asarray(outputs, np.float64)
    if task == "classification":
        n = outputs.shape[1]
        names = list(label_names) or [str(i) for i in range(n)]
        y, pred = labels.astype(np.int64), outputs.argmax(axis=1)
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        out = {
            "loss": float(-logp[np.arange(len(y)), y].mean()) if len(y) else 0.0,
            "accuracy": accuracy(y, pred),
            "macro_f1": macro_f1(y, pred, n),
        }
        cm = confusion_matrix(y, pred, n)
        for i, t in enumerate(names):
            for j, p in enumerate(names):
                out[f"cm/{t}/{p}"] = float(cm[i, j])
        return out
    if task == "multilabel":
        y, pred = labels > 0.5, outputs > 0.0
        bce = np.logaddexp(0.0, outputs) - labels * outputs
        return {
            "loss": float(bce.mean()),
            "accuracy": accuracy(y, pred),
            "macro_f1": multilabel_macro_f1(y, pred),
            "label_accuracy": float((y == pred).mean()),
        }
    if task == "regression":
        pred, y = outputs[:, 0], labels.astype(np.float64).reshape(-1)
        err = pred - y
        pearson = float(np.corrcoef(pred, y)[0, 1]) if len(y) > 1 and pred.std() > 0 else 0.0
        mse = float((err**2).mean())
        return {"loss": mse, "mse": mse, "mae": float(np.abs(err).mean()), "pearson": pearson}
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def evaluate(
    model, batches: Sequence[dict], task: str = "classification", label_names=(), prefix=""
) -> dict[str, float]:
    """Runs `model` over `batches` and returns `{prefix + metric: value}` (see
    `metrics_from_outputs` for the metrics of each task)."""
    outputs, labels = predict(model, batches)
    values = metrics_from_outputs(outputs, labels, task, label_names)
    return {prefix + k: v for k, v in values.items()}


def confusion_from_metrics(values: dict, label_names: Sequence[str], prefix: str = "") -> list:
    """The `[C, C]` confusion matrix (nested lists, rows = true class) from `cm/<t>/<p>` keys."""
    return [[int(values.get(f"{prefix}cm/{t}/{p}", 0)) for p in label_names] for t in label_names]
