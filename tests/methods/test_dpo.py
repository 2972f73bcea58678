"""DPO end to end on smoke settings through `fft.main.run`, plus the ranking -> pairs recipe and
the reference log-probs cache."""

import json
import os

import numpy as np
import pytest

from fft import config_lib, main
from fft.methods import dpo

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _config(variant):
    return config_lib.load_config(os.path.join(ROOT, "configs/dpo.py"), variant)


def test_ranking_to_pairs():
    rec = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "order": [1, 2, 0]}
    pairs = dpo.ranking_to_pairs(rec)
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    assert got == {("b", "a"), ("c", "a"), ("b", "c")}
    assert all("ranking" not in p and p["prompt"] == "p" for p in pairs)


def test_review_pairs_for_sentiment_generation():
    from fft.data.synthetic import World

    config = _config("sentiment")
    config.dpo.train_pairs = 20
    pairs = dpo.pair_records(config, World(0))
    assert len(pairs) == 20 and {"prompt", "chosen", "rejected"} <= set(pairs[0])
    config.dpo.data = "rankings"
    with pytest.raises(config_lib.ConfigError, match="dpo.data='pairs'"):
        dpo.pair_records(config, World(0))


def test_row_stream_resumes():
    rows = {"x": np.arange(10)}
    a = dpo.RowStream(rows, 4, seed=3)
    [next(a) for _ in range(3)]
    state = a.get_state()
    want = [next(a)["x"] for _ in range(3)]
    b = dpo.RowStream(rows, 4, seed=3)
    b.set_state(state)
    assert all((next(b)["x"] == w).all() for w in want)


def test_dpo_smoke(tmp_path):
    workdir = str(tmp_path)
    results = main.run(_config("smoke"), workdir)
    assert results["steps"] == 6
    for split in ("before", "after"):
        assert {"true_reward", "win_rate", "kl"} <= set(results[split])
    # Reference log-probs were computed once and cached next to the checkpoints.
    with np.load(os.path.join(workdir, "dpo_reference.npz")) as f:
        assert f["ref_chosen_logp"].shape == f["ref_rejected_logp"].shape
        assert (f["ref_chosen_logp"] < 0).all()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train = [json.loads(x) for x in f if '"split": "train"' in x]
    assert {"reward_margin", "reward_accuracy"} <= set(train[-1])


def test_reference_cache_is_keyed_on_rows_and_reference(tmp_path, capsys):
    """Same number of pairs, other data or another reference: recomputed, never reused."""
    from flax import nnx

    from fft.models import presets
    from fft.models.transformer import Transformer

    cfg = presets.get_preset("micro").replace(vocab_size=64)
    ref_a, ref_b = Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(1))
    rows = {"chosen_tokens": np.arange(12).reshape(3, 4), "rejected_tokens": np.ones((3, 4))}
    other = {"chosen_tokens": np.arange(12).reshape(3, 4) + 1, "rejected_tokens": np.ones((3, 4))}
    path = str(tmp_path / "dpo_reference.npz")
    calls = []

    def compute(value):
        def f():
            calls.append(value)
            return {"ref_chosen_logp": np.full(3, value, np.float32)}

        return f

    key = dpo.reference_key(rows, ref_a)
    assert dpo._cached_reference(path, key, compute(-1.0))["ref_chosen_logp"][0] == -1.0
    assert dpo._cached_reference(path, key, compute(-2.0))["ref_chosen_logp"][0] == -1.0
    assert "read from" in capsys.readouterr().out
    for k in (dpo.reference_key(other, ref_a), dpo.reference_key(rows, ref_b)):
        assert k != key
        assert dpo._cached_reference(path, k, compute(-3.0))["ref_chosen_logp"][0] == -3.0
    assert calls == [-1.0, -3.0, -3.0]


def test_frozen_reference_stores_the_compute_dtype_with_auto_params():
    """A full-fine-tuning reference is never updated: with model.param_dtype='auto' it keeps
    its weights in the compute dtype (bf16 on accelerators, half the memory), else as given."""
    from fft.models import presets
    from fft.train import lm

    config = config_lib.load_config(os.path.join(ROOT, "configs/dpo.py"), "smoke")
    mc = presets.get_preset("micro").replace(dtype="bfloat16", param_dtype="float32")
    config.model.param_dtype = "auto"
    assert lm.frozen_model_config(mc, config).param_dtype == "bfloat16"
    config.model.param_dtype = "float32"
    assert lm.frozen_model_config(mc, config) == mc
