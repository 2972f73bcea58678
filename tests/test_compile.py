"""fft.compile: slice names -> shapes always; a real TPU compile where libtpu is installed.

`pip install -e '.[tpu]'` (or `libtpu` on PYTHONPATH / `TPU_LIBRARY_PATH`) enables the
compile tests; no TPU is needed. Without libtpu they are skipped.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from fft import compile as aot
from fft import config_lib

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None or os.path.exists(
    os.environ.get("TPU_LIBRARY_PATH", "/nonexistent")
)
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason="libtpu not installed (pip install -e '.[tpu]')"
)


@pytest.mark.parametrize(
    "name, libtpu_name, chips",
    [
        ("v5e-256", "v5e:16x16", 256),
        ("v5e-8", "v5e:2x4", 8),
        ("v6e-32", "v6e:4x8", 32),
        ("v4-8", "v4:2x2x1", 4),
        ("v4-128", "v4:4x4x4", 64),
        ("v5p-512", "v5p:4x8x8", 256),
        ("v5p-2048", "v5p:8x8x16", 1024),
        ("v5litepod-16", "v5e:4x4", 16),
        ("v5e:4x8", "v5e:4x8", 32),
    ],
)
def test_topology_names(name, libtpu_name, chips):
    topo = aot.parse_topology(name)
    assert (topo.libtpu_name, topo.chips) == (libtpu_name, chips)


def test_bad_topology_names():
    with pytest.raises(aot.CompileError, match="unknown topology"):
        aot.parse_topology("tpu-9000")
    with pytest.raises(aot.CompileError, match="explicitly"):
        aot.parse_topology("v5p-384")  # 192 chips: give the shape, e.g. v5p:4x4x12
    with pytest.raises(aot.CompileError, match="3 dimensions"):
        aot.parse_topology("v4:4x4")


def _set(c, kw: dict):
    """`c` with the dotted overrides `kw` applied (as `--config.a.b=v` would)."""
    for k, v in kw.items():
        node = c
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    return c


def _config(**kw):
    c = config_lib.pretrain_config("micro")
    c.batch_size, c.seq_len = 8, 64
    return _set(c, kw)


@needs_libtpu
def test_compile_micro_for_v5e_fsdp():
    import jax

    jax.config.update("jax_platforms", "cpu")
    cfg = _config(**{"mesh.data": 1, "mesh.fsdp": -1, "model.dtype": "bfloat16"})
    r = aot.compile_for_topology(cfg, "v5e-4")
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r["device_kind"].startswith("TPU v5")
    assert r["fits"] and r["per_chip_bytes"]["hbm"] == 16 * aot.GiB
    mem = r["per_chip_bytes"]
    # FSDP: each chip holds about a quarter of the f32 params (norms stay replicated).
    assert mem["params"] < 0.3 * r["params"] * 4
    assert mem["optimizer"] > mem["params"]  # Adam: two moments per param
    # The compiled step does about the model's FLOPs (6N per token plus attention).
    assert 0.5 < r["flops_per_step"] / r["model_flops_per_step"] < 2.0
    assert "FITS" in aot.format_report(r)


@needs_libtpu
def test_does_not_fit_is_reported():
    import jax

    from fft.models import presets

    jax.config.update("jax_platforms", "cpu")
    # 2 x 2^22 x 512 f32 embeddings/head + Adam = ~48 GiB replicated on every 16 GiB chip.
    big = presets.get_preset("micro").replace(vocab_size=2**22, d_model=512)
    try:
        r = aot.compile_for_topology(_config(), "v5e-4", model_config=big)
    except aot.CompileError as e:  # the TPU compiler itself may refuse it
        assert str(e).startswith("does not fit") and "fsdp" in str(e)
    else:
        assert not r["fits"] and "DOES NOT FIT" in aot.format_report(r)


@needs_libtpu
def test_compile_qlora_with_auto_dtypes_and_splash():
    """Issue 19 items 2/3/5: `auto` dtypes resolve for the TPU (bf16 compute, bf16 frozen base),
    an nf4 base compiles with splash attention, and its weights take less HBM than bf16's."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    common = {"model.dtype": "auto", "model.param_dtype": "auto", "model.attention": "splash",
              "lora.rank": 4, "seq_len": 128, "mesh.data": 1, "mesh.fsdp": -1}  # fmt: skip
    lora = aot.compile_for_topology(_config(**common), "v5e-4")
    qlora = aot.compile_for_topology(_config(**common, **{"model.quant": "nf4"}), "v5e-4")
    for r in (lora, qlora):
        assert (r["dtype"], r["param_dtype"], r["attention"]) == ("bfloat16", "bfloat16", "splash")
    assert qlora["quant"] == "nf4" and qlora["params"] == lora["params"]
    assert qlora["per_chip_bytes"]["params"] < lora["per_chip_bytes"]["params"]
    assert qlora["per_chip_bytes"]["optimizer"] == lora["per_chip_bytes"]["optimizer"]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKES = ["pretrain", "instruction", "domain", "continual", "transfer", "reward", "dpo",
          "rlhf", "rlhf:smoke_grpo"]  # fmt: skip


def _smoke(name: str, **kw):
    module, _, variant = name.partition(":")
    c = config_lib.load_config(os.path.join(ROOT, "configs", f"{module}.py"), variant or "smoke")
    with c.unlocked():
        return _set(c, kw)


@pytest.mark.parametrize("name", SMOKES)
def test_every_method_lowers_through_the_trainers_assembly(name):
    """Each method's Recipe (abstract base: no weights, no data) through `trainer.prepare`,
    lowered and compiled for 4 CPU devices: what fft.compile does for a TPU slice."""
    import jax

    from fft.models import presets
    from fft.train import lm

    cfg = _smoke(name)
    mc = presets.get_preset("micro").replace(max_seq_len=max(cfg.seq_len, 64))
    mc = lm.runtime_options(mc, cfg, platform="cpu")
    lowered, prep, recipe, spec = aot.lower_train_step(cfg, mc, jax.devices()[:4])
    assert lowered.compile() is not None
    assert recipe.method == cfg.method and all(v.shape[0] == cfg.batch_size for v in spec.values())
    extra = aot.extra_model_bytes(recipe, prep.mesh, prep.rules)
    needs_reference = cfg.method in ("dpo", "rlhf") and cfg.lora.rank == 0
    assert ("reference" in extra) == needs_reference, extra


@needs_libtpu
@pytest.mark.parametrize("name, lora", [("dpo", 0), ("dpo", 4), ("rlhf", 0), ("rlhf", 4)])
def test_rl_methods_report_their_reference_sharded(name, lora):
    """Issue 18: the reference (full fine-tuning) is placed like the policy, ~1/4 per chip on
    fsdp=4; with LoRA it is the policy itself (no second copy)."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    cfg = _smoke(name, **{"lora.rank": lora, "mesh.data": 1, "mesh.fsdp": -1})
    r = aot.compile_for_topology(cfg, "v5e-4", preset="micro")
    mem = r["per_chip_bytes"]
    if lora:
        assert r.get("reference_shared") and "reference" not in mem["extra_models"]
    else:
        ref = mem["extra_models"]["reference"]
        assert 0 < ref < 0.5 * r["params"] * 4  # sharded: well under a whole f32 copy
        assert mem["total"] >= ref + mem["params"]
    if name == "rlhf":
        assert mem["value_head"] > 0
    assert r["fits"] and r["method"] == name
