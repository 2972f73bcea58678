"""Data parallel, FSDP, tensor parallel and data x tensor give the single-device result."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "train"))

from toy_lm import build, lm_loss, make_batch  # noqa: E402

from fft import sharding  # noqa: E402
from fft.config_lib import ConfigError  # noqa: E402
from fft.models.presets import get_preset  # noqa: E402
from fft.models.transformer import Transformer  # noqa: E402
from fft.train import losses, optim  # noqa: E402
from fft.train.state import TrainState, split_model  # noqa: E402
from fft.train.step import make_train_step  # noqa: E402

MESHES = {
    "single": None,
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "tensor4": dict(data=2, tensor=4),
    "tensor8": dict(data=1, tensor=8),
    "data2_tensor4": dict(data=2, fsdp=1, tensor=4),
    "fsdp2_tensor4": dict(data=1, fsdp=2, tensor=4),
}


def _micro():
    return Transformer(get_preset("micro"), rngs=nnx.Rngs(0))


def _transformer_loss(model, batch, rng):
    del rng
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    loss = losses.chunked_next_token_loss(hidden, model.logits, batch, chunk=8)
    return loss, {"loss_weight": losses.num_targets(batch)}


def _run(mesh_kw, build_model, loss_fn, batches, opt="adamw"):
    devices = [jax.devices()[0]] if mesh_kw is None else None
    mesh = sharding.make_mesh(**(mesh_kw or {"data": 1}), devices=devices)
    rules = sharding.DEFAULT_RULES
    cfg = {"name": opt, "lr": 1e-2, "schedule": "constant", "weight_decay": 0.1}
    with sharding.use_mesh(mesh, rules):
        graphdef, abs_params, _ = split_model(nnx.eval_shape(build_model), nnx.Param)
        tx, sched = optim.make_optimizer(cfg, 10, abs_params)

        def init():
            _, params, frozen = split_model(build_model(), nnx.Param)
            return TrainState(
                jnp.zeros((), jnp.int32), params, frozen, tx.init(params), jax.random.key(0)
            )

        state_sh = sharding.state_shardings(jax.eval_shape(init), mesh, rules)
        state = jax.jit(init, out_shardings=state_sh)()
        step = jax.jit(
            make_train_step(graphdef, loss_fn, tx, schedule=sched),
            out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
            donate_argnums=0,
        )
        out = []
        for b in batches:
            state, metrics = step(state, sharding.put_batch(b, mesh))
            out.append(float(metrics["loss"]))
        return out, jax.device_get(state.params), state_sh


@pytest.mark.parametrize("model", ["toy", "micro"])
def test_meshes_match_single_device(model):
    # Adam divides by sqrt(v): for near-zero gradients (embedding rows of unseen tokens) it
    # turns float rounding of a different reduction order into O(1) relative differences, so
    # the Transformer is compared under SGD with momentum (its update is linear in the grads).
    opt = "adamw"
    if model == "toy":
        build_model, loss_fn = build(), lm_loss
        batches = [make_batch(i, 8) for i in range(2)]
    else:
        build_model, loss_fn, opt = _micro, _transformer_loss, "sgd"
        batches = []
        for i in range(2):
            b = make_batch(i, 8, seq_len=16)
            b["tokens"] = b["tokens"] * 13 % 512
            batches.append(b)
    ref_loss, ref_params, _ = _run(None, build_model, loss_fn, batches, opt)
    for name, kw in MESHES.items():
        if name == "single":
            continue
        loss, params, state_sh = _run(kw, build_model, loss_fn, batches, opt)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
        specs = {s.spec for s in jax.tree.leaves(state_sh.params)}
        assert any(s != PartitionSpec() for s in specs) or name.startswith("data"), name


def test_make_mesh_and_errors():
    assert dict(sharding.make_mesh(data=-1, tensor=2).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ConfigError, match="devices"):
        sharding.make_mesh(data=3)
    with pytest.raises(ConfigError, match="divide"):
        sharding.make_mesh(data=-1, tensor=3)
    mesh = sharding.make_mesh(data=2, fsdp=4)
    with pytest.raises(ConfigError, match="batch_size=6"):
        sharding.check_batch_size(6, mesh)
    sharding.check_batch_size(16, mesh)
    with pytest.raises(ConfigError, match="unknown mesh axis"):
        sharding.logical_to_spec(("embed",), [("embed", "model")])


def test_mesh_errors_name_the_axis_and_a_fix():
    """Issue 17 #8: each mesh mismatch names the key, the device count and a value that fits."""
    cases = [
        (dict(data=3), ["config.mesh.data=3", "8 devices", "--config.mesh.data=8"]),
        (dict(data=2, fsdp=3), ["config.mesh.fsdp=3", "8 devices", "--config.mesh.fsdp=4"]),
        (dict(data=-1, tensor=3), ["config.mesh.tensor=3", "8 devices", "--config.mesh.tensor=2"]),
        (dict(data=-1, fsdp=-1), ["at most one"]),
    ]
    for kw, wanted in cases:
        with pytest.raises(ConfigError) as e:
            sharding.make_mesh(**kw)
        for text in wanted:
            assert text in str(e.value), (kw, str(e.value))
    with pytest.raises(ConfigError, match=r"config.batch_size=6 .* --config.batch_size=8"):
        sharding.check_batch_size(6, sharding.make_mesh(data=2, fsdp=4))


def test_heads_that_do_not_split_over_tensor():
    """Issue 17 #8: query heads must divide over mesh.tensor; KV heads may be replicated over
    their group (tensor a multiple of them) but not split raggedly."""
    micro = get_preset("micro")  # 4 heads, 2 KV heads
    sharding.check_model_fits(micro, sharding.make_mesh(data=2, tensor=4))  # KV replicated
    sharding.check_model_fits(None, sharding.make_mesh(data=1, tensor=8))  # not a decoder
    with pytest.raises(ConfigError, match=r"mesh.tensor=8 .* 4 attention heads.*tensor=4"):
        sharding.check_model_fits(micro, sharding.make_mesh(data=1, tensor=8))
    ragged = micro.replace(n_heads=6, n_kv_heads=3, head_dim=16)
    with pytest.raises(ConfigError, match=r"mesh.tensor=2 .* 3 KV heads.*tensor=1"):
        sharding.check_model_fits(ragged, sharding.make_mesh(data=4, tensor=2))


def test_logical_to_spec_rules():
    P = PartitionSpec
    assert sharding.logical_to_spec(("batch", "length", "act_embed")) == P(
        ("data", "fsdp"), None, None
    )
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    # a mesh axis is used once per spec
    assert sharding.logical_to_spec(("mlp", "vocab")) == P("tensor", None)
    rules = sharding.rules_from_config([("embed", None)])
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == P(None, "tensor")


def test_constrain_is_noop_outside_and_shards_inside():
    x = jnp.ones((8, 4))
    assert sharding.constrain(x, ("batch", "act_mlp")) is x
    mesh = sharding.make_mesh(data=2, tensor=4)
    with sharding.use_mesh(mesh):
        y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", "act_mlp")))(x)
        # 2 kv heads on tensor=4 do not divide: that dim stays replicated instead of failing
        z = jax.jit(lambda a: sharding.constrain(a, ("batch", "act_kv_heads")))(jnp.ones((8, 2)))
    want_y = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor"))
    assert y.sharding.is_equivalent_to(want_y, 2)
    assert z.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("data", None)), 2)


def test_put_batch_shards_rows():
    mesh = sharding.make_mesh(data=8)
    batch = sharding.put_batch(
        {"tokens": np.arange(32).reshape(8, 4), "labels": np.arange(8)}, mesh
    )
    assert batch["tokens"].sharding.spec == PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(batch["labels"], np.arange(8))


def test_replicated_dim_warns_once_naming_it(caplog):
    """Issue 17 #9: a dim left replicated because it does not divide its mesh axis is a warning
    naming the parameter, the dim, its size and the axis, logged once (not per layer, per
    optimizer moment, or per traced activation)."""
    mesh = sharding.make_mesh(data=1, tensor=8)
    cfg = get_preset("micro").replace(vocab_size=300, n_heads=8, n_kv_heads=8, head_dim=8)
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    sharding._WARNED.clear()  # other tests may have reported the same dims
    with caplog.at_level("WARNING", logger="fft.sharding"):
        for _ in range(2):  # e.g. params, then optimizer state of the same shapes
            sh = sharding.state_shardings(abstract, mesh)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        with sharding.use_mesh(mesh):
            for t in (4, 6):  # two traces; the logits dim repeats in each
                nnx.jit(lambda m, x: m(x))(model, jnp.zeros((2, t), jnp.int32))
    assert sh["embed"]["embedding"].get_value().spec == PartitionSpec(None, "fsdp")
    messages = [r.getMessage() for r in caplog.records if "does not divide" in r.getMessage()]
    params = [m for m in messages if not m.startswith("sharding: activation")]
    assert len(params) == 1, messages  # embed.embedding and lm_head.kernel share the dim
    for text in ("embed.embedding", "dim 0", "'vocab'", "size 300", "'tensor' (size 8)"):
        assert text in params[0], params[0]
    acts = [m for m in messages if m.startswith("sharding: activation")]
    assert len(acts) == 1 and "'act_vocab', size 300" in acts[0], messages
    assert all(r.levelname == "WARNING" for r in caplog.records if "does not divide" in r.msg)
