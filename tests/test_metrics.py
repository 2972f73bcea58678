"""Metric writers, NaN guard, table formatting."""

import json
import math
import os

import jax.numpy as jnp
import pytest

from fft import metrics
from fft.config_lib import FFTError


def test_writer_jsonl_and_tensorboard(tmp_path):
    w = metrics.MetricWriter(str(tmp_path))
    w.write(3, {"loss": jnp.float32(1.5), "lr": 0.1, "name": "skipped-non-numeric"})
    w.write(3, {"ppl": 4.0}, split="eval")
    w.close()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert lines[0]["step"] == 3 and lines[0]["split"] == "train" and lines[0]["loss"] == 1.5
    assert "name" not in lines[0] and lines[1] == {**lines[1], "split": "eval", "ppl": 4.0}
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def test_check_finite_names_step_and_metric():
    metrics.check_finite({"loss": 1.0, "grad_norm": jnp.float32(2.0)}, step=5)
    with pytest.raises(metrics.NonFiniteError, match=r"step 7: metric 'grad_norm' is inf"):
        metrics.check_finite({"loss": 1.0, "grad_norm": math.inf}, step=7)
    assert issubclass(metrics.NonFiniteError, FFTError)


def test_format_table_and_timer():
    table = metrics.format_table({"loss": 2.0, "ppl": 7.389}, {"loss": 1.5, "acc": 0.9})
    rows = table.splitlines()
    assert rows[0].split() == ["metric", "better", "before", "after", "change"]
    assert rows[2].split() == ["loss", "lower", "2.0000", "1.5000", "-25.0%", "better"]
    assert rows[4].split() == ["acc", "higher", "-", "0.9000", "-"]
    t = metrics.StepTimer()
    t.tick(100)
    lap = t.lap()
    assert lap["tokens_per_s"] > 0 and lap["steps_per_s"] > 0
