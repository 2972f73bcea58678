"""RLHF end to end on smoke settings: PPO (LoRA) and GRPO (full, separate reference) through
`fft.main.run`, and resume mid-PPO (mid-rollout, from the checkpointed rollout buffer) giving
params identical to an uninterrupted run."""

import json
import os

import numpy as np
import pytest

from fft import config_lib, main, pretrained

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _config(variant, **overrides):
    return config_lib.load_config(os.path.join(ROOT, "configs/rlhf.py"), variant, **overrides)


def _train_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"split": "train"' in line]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ppo"))
    return workdir, main.run(_config("smoke", checkpoint_every=2), workdir)


def test_ppo_smoke(ppo_run):
    workdir, results = ppo_run
    assert results["steps"] == 4
    for split in ("before", "after"):
        assert {"true_reward", "true_reward_sampled", "win_rate", "kl"} <= set(results[split])
    assert results["before"]["win_rate"] == 0.5 and results["before"]["kl"] == 0.0
    lines = _train_lines(workdir)
    keys = {"reward", "true_reward", "kl", "kl_coef", "entropy", "clip_frac", "value_loss",
            "rollout_s", "update_s", "policy_loss"}  # fmt: skip
    assert keys <= set(lines[-1])
    # The sampler's log-probs and the teacher-forced ones agree.
    assert max(line["logp_gap"] for line in lines) < 1e-3
    assert os.path.exists(os.path.join(workdir, "results.json"))


def test_ppo_resume_mid_rollout_gives_identical_params(ppo_run, tmp_path):
    ref_dir, _ = ppo_run
    workdir = str(tmp_path / "resumed")
    # Stop after 3 steps: mid-way through the second rollout (2 minibatches per rollout).
    stopped = main.run(_config("smoke", steps=3, checkpoint_every=0), workdir)
    assert stopped["steps"] == 3
    with open(os.path.join(workdir, "checkpoints", "3", "data", "metadata")) as f:
        data_state = json.load(f)["data_by_process"][0]  # the one process
    assert data_state["buffer"] is not None  # the rollout in progress was saved
    resumed = main.run(_config("smoke", steps=4, checkpoint_every=0), workdir)
    assert resumed["steps"] == 4
    want, got = pretrained.read_raw_params(ref_dir), pretrained.read_raw_params(workdir)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(want[name], got[name], err_msg=name)


def test_grpo_smoke(tmp_path):
    # On the other prompt set: continuing review openings, judged by their sentiment.
    results = main.run(_config("smoke_grpo", **{"rlhf.prompts": "reviews"}), str(tmp_path))
    assert results["steps"] == 4
    assert {"true_reward", "win_rate", "kl"} <= set(results["after"])
    assert -1.0 <= results["after"]["true_reward"] < 1.0
    line = _train_lines(str(tmp_path))[-1]
    assert "kl_loss" in line and "value_loss" not in line


def test_unknown_prompt_set_is_a_config_error(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="config.rlhf.prompts='movies'"):
        main.run(_config("smoke", **{"rlhf.prompts": "movies"}), str(tmp_path))


def test_dapo_smoke_with_dynamic_sampling_and_overlong_shaping(tmp_path):
    # The arithmetic task and its reward as code; the micro model answers nothing right, so
    # most groups score alike: dropped, then filled back after max_sampling_rounds.
    overrides = {"rlhf.algo": "dapo", "rlhf.prompts": "arithmetic", "rlhf.dynamic_sampling": True,
                 "rlhf.max_sampling_rounds": 2, "rlhf.overlong_buffer": 4}  # fmt: skip
    results = main.run(_config("smoke", **overrides), str(tmp_path))
    assert results["steps"] == 4
    assert {"true_reward", "reward", "kl"} <= set(results["after"])
    line = _train_lines(str(tmp_path))[-1]
    assert {"dropped_groups", "filled_groups", "overlong_penalty", "kl_loss"} <= set(line)
    assert "value_loss" not in line and line["sampling_rounds"] <= 2
