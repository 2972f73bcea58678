"""Schedules at key steps, optimizer construction, decay mask, lr multipliers, grad accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_lm import ToyIterator, build, lm_loss, make_batch

from fft.config_lib import ConfigError
from fft.train import optim
from fft.train.state import TrainState, split_model, trainable_filter_from_config
from fft.train.step import make_train_step


def _lr(s, step):
    return float(s(jnp.asarray(step)))


def test_schedules_at_key_steps():
    lr, total = 1.0, 100
    s = optim.make_schedule("constant", lr, total, warmup_steps=10)
    assert _lr(s, 0) == pytest.approx(0.1) and _lr(s, 9) == 1.0 and _lr(s, 99) == 1.0
    s = optim.make_schedule("warmup_cosine", lr, total, warmup_steps=10, min_lr_ratio=0.1)
    assert _lr(s, 4) == pytest.approx(0.5)
    assert _lr(s, 10) == pytest.approx(1.0)
    assert _lr(s, 55) == pytest.approx(0.55, abs=1e-6)  # halfway down the cosine
    assert _lr(s, 100) == pytest.approx(0.1)
    s = optim.make_schedule("linear", lr, total, warmup_steps=0, min_lr_ratio=0.0)
    assert _lr(s, 0) == 1.0 and _lr(s, 50) == pytest.approx(0.5) and _lr(s, 100) == 0.0
    s = optim.make_schedule("wsd", lr, total, warmup_steps=10, stable_fraction=0.5)
    # stable until 100 - 45 = 55, then linear to 0 at 100
    assert _lr(s, 30) == 1.0 and _lr(s, 55) == 1.0
    assert _lr(s, 77) == pytest.approx(0.5, abs=0.02) and _lr(s, 100) == 0.0
    s = optim.make_schedule("wsd", lr, total, decay_steps=20, min_lr_ratio=0.1)
    assert _lr(s, 79) == 1.0 and _lr(s, 90) == pytest.approx(0.55)
    s = optim.make_schedule(
        "rewarm", lr, total, warmup_steps=5, min_lr_ratio=0.0, rewarm_steps=[40, 70]
    )
    assert _lr(s, 0) == pytest.approx(0.2) and _lr(s, 5) == 1.0
    assert _lr(s, 39) < 0.01  # end of cycle 1
    assert _lr(s, 40) == pytest.approx(0.2) and _lr(s, 45) == 1.0  # re-warm
    assert _lr(s, 69) < 0.02 and _lr(s, 72) == pytest.approx(0.6) and _lr(s, 99) < 0.02
    with pytest.raises(ConfigError, match="schedule"):
        optim.make_schedule("nope", lr, total)


def _params():
    _, params, _ = split_model(build()(), nnx.Param)
    return params


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_optimizers_update(name):
    params = _params()
    cfg = {"name": name, "lr": 0.1, "schedule": "constant", "weight_decay": 0.1, "clip_norm": 1.0}
    tx, sched = optim.make_optimizer(cfg, 10, params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    assert float(sched(0)) == pytest.approx(0.1)


def test_decay_mask_and_lr_multipliers():
    params = _params()
    mask = optim.decay_mask(params)
    assert bool(mask["layers"][0]["up"].get_value()) and not bool(
        mask["layers"][0]["norm"].get_value()
    )
    assert not bool(mask["layers"][0]["up_bias"].get_value())
    # weight decay only: zero grads -> updates are -lr * wd * p on >=2-D params only
    cfg = {"name": "adamw", "lr": 1.0, "schedule": "constant", "weight_decay": 0.5}
    fn = optim.layerwise_lr_decay(2, 0.5)
    assert fn("layers.1.up") == 0.5 and fn("layers.0.up") == 0.25 and fn("embed") == 0.125
    assert fn("lm_head") == 1.0
    tx, _ = optim.make_optimizer(cfg, 10, params, fn)
    zeros = jax.tree.map(jnp.zeros_like, params)
    up, _ = tx.update(zeros, tx.init(params), params)
    p0 = params["layers"][0]["up"].get_value()
    np.testing.assert_allclose(up["layers"][0]["up"].get_value(), -0.5 * 0.25 * p0, rtol=1e-6)
    np.testing.assert_allclose(up["lm_head"].get_value(), -0.5 * params["lm_head"].get_value())
    assert np.all(up["final_norm"].get_value() == 0)


def test_trainable_filter_regex():
    _, params, frozen = split_model(build()(), trainable_filter_from_config(r"^layers\.1\."))
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert names == {"layers.1.norm", "layers.1.up", "layers.1.up_bias", "layers.1.down"}
    assert "embed" in {".".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen)}
    with pytest.raises(ConfigError, match="trainable"):
        trainable_filter_from_config("(")


def _state(params, frozen, tx):
    return TrainState(jnp.zeros((), jnp.int32), params, frozen, tx.init(params), jax.random.key(0))


def test_grad_accumulation_equals_big_batch():
    graphdef, params, frozen = split_model(build()(), nnx.Param)
    cfg = {"name": "adamw", "lr": 1e-2, "schedule": "constant", "clip_norm": 0.5}
    tx, sched = optim.make_optimizer(cfg, 10, params)
    batch = make_batch(0, 8)  # ragged loss masks: microbatches hold different token counts
    results = []
    for k in (1, 4):
        step = jax.jit(make_train_step(graphdef, lm_loss, tx, grad_accum=k, schedule=sched))
        state, metrics = step(_state(params, frozen, tx), batch)
        results.append((state, metrics))
    (s1, m1), (s4, m4) = results
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(m4["loss_weight"], m1["loss_weight"])
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(s4.step) == 1 and float(m1["lr"]) == pytest.approx(1e-2)


def test_frozen_params_do_not_change():
    graphdef, params, frozen = split_model(build()(), trainable_filter_from_config(r"lm_head"))
    tx, _ = optim.make_optimizer({"name": "sgd", "lr": 0.1, "schedule": "constant"}, 10, params)
    step = jax.jit(make_train_step(graphdef, lm_loss, tx))
    it = ToyIterator(4)
    state = _state(params, frozen, tx)
    state, _ = step(state, next(it))
    assert not np.allclose(state.params["lm_head"].get_value(), params["lm_head"].get_value())
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(a, b)
