"""The training loop in-process: evals, results.json, the NaN guard naming the step."""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from toy_lm import ToyIterator, build, lm_loss, train
from toy_run import config

from fft.metrics import NonFiniteError
from fft.train import losses


def test_train_writes_results_and_improves(tmp_path):
    cfg = config(12)
    cfg.optim.lr, cfg.checkpoint_every, cfg.eval_every = 3e-2, 0, 6
    cfg.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2))
    fixed = ToyIterator(8)
    eval_batch = next(fixed)

    def evaluate(model):
        return {"loss": float(losses.next_token_loss(model(eval_batch["tokens"]), eval_batch))}

    class Repeat(ToyIterator):  # the same batch every step: the loss must go down
        def __next__(self):
            self.index += 1
            return eval_batch

    res = train(cfg, str(tmp_path), method="toy", build_model=build(), loss_fn=lm_loss,
                train_data=Repeat(8), evaluate=evaluate)  # fmt: skip
    assert res["after"]["loss"] < res["before"]["loss"] - 0.2
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["steps"] == 12 and saved["cost"]["trainable_params"] == 3184
    assert saved["cost"]["tokens"] > 0 and saved["cost"]["train_flops"] > 0
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert {ln["split"] for ln in lines} >= {"train", "eval", "eval_before", "eval_after"}
    train_lines = [ln for ln in lines if ln["split"] == "train"]
    assert all(k in train_lines[0] for k in ("loss", "lr", "grad_norm", "tokens_per_s"))
    assert (tmp_path / "config.json").exists()


def test_nan_guard_stops_naming_the_step(tmp_path):
    def poisoned_loss(model, batch, rng):
        loss, aux = lm_loss(model, batch, rng)
        return loss + batch["poison"][0], aux

    class Poisoned(ToyIterator):
        def __next__(self):
            batch = super().__next__()
            batch["poison"] = np.full((8,), np.nan if self.index == 4 else 0.0, np.float32)
            return batch

    cfg = config(10)
    cfg.checkpoint_every, cfg.mesh.data, cfg.mesh.tensor = 0, 4, 2
    with pytest.raises(NonFiniteError, match=r"step 4: metric 'loss' is nan"):
        train(cfg, str(tmp_path), method="toy", build_model=build(), loss_fn=poisoned_loss,
              train_data=Poisoned(8))  # fmt: skip
    assert jnp.isfinite(0.0)


def test_changed_settings_on_resume_are_named():
    from fft.train.run_files import changed_settings as _changed_settings

    old = {"batch_size": 16, "optim": {"lr": 1e-3, "b1": 0.9}, "steps": 10}
    new = {"batch_size": 8, "optim": {"lr": 1e-3, "b1": 0.9}, "steps": 10, "seed": 1}
    assert _changed_settings(old, new) == ["batch_size: 16 -> 8", "seed: None -> 1"]


def test_data_state_is_kept_per_process():
    from fft.config_lib import ConfigError
    from fft.train.trainer import gather_data_states as _gather_data_states
    from fft.train.trainer import own_data_state as _own_data_state

    state = {"shard": 3, "offset": 17}
    saved = {"data_by_process": _gather_data_states(state)}
    assert saved["data_by_process"] == [state]  # one process here: its own entry
    assert _own_data_state(saved) == state
    assert _own_data_state({"data": state}) == state  # checkpoints of older versions
    # Another process count: a global position (all entries equal) carries over ...
    assert _own_data_state({"data_by_process": [state, state]}) == state
    # ... per-host positions cannot be re-split.
    with pytest.raises(ConfigError, match="2 processes, which differ, but this run has 1"):
        _own_data_state({"data_by_process": [state, {"shard": 4, "offset": 0}]})
