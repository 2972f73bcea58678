"""Reward model end to end on smoke settings through `fft.main.run`; the trained workdir loads
back as a reward model and scores sequences."""

import os

import numpy as np

from fft import config_lib, main
from fft.data.synthetic import World
from fft.rl import rewards
from fft.rl.rollout import encode_prompts

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _config(variant):
    return config_lib.load_config(os.path.join(ROOT, "configs/reward.py"), variant)


def test_reward_smoke_and_load(tmp_path):
    workdir = str(tmp_path)
    results = main.run(_config("smoke"), workdir)
    assert results["steps"] == 6
    for split in ("before", "after"):
        assert 0.0 <= results[split]["pairwise_accuracy"] <= 1.0
    model, tokenizer = rewards.load_reward_model(workdir)
    records = World(0).instruction_data("test", 2)
    tokens, mask = encode_prompts(records, tokenizer, 64)
    seqs = {"tokens": tokens, "positions": np.maximum(mask.cumsum(1) - 1, 0), "segment_ids": mask}
    scores = rewards.reward_model_fn(model)(records, seqs, ["", ""])
    assert scores.shape == (2,) and np.isfinite(scores).all()
