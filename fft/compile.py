"""Ahead-of-time check: does this config compile and fit on a TPU slice? Run on a CPU host.

    pip install -e '.[tpu]'          # libtpu: the TPU compiler; no TPU needed to use it
    python -m fft.compile --config=configs/pretrain.py --topology=v5e-256 \\
        --config.model.preset=7b --config.batch_size=256 --config.seq_len=4096 \\
        --config.mesh.data=1 --config.mesh.fsdp=-1 --config.model.remat=full

The train step (the method's Recipe through `fft.train.trainer.prepare`, the assembly the
Trainer runs: the same function, shardings and donation) is
lowered for the slice's devices (`jax.experimental.topologies`: compile-only devices made by
libtpu) and compiled by the real TPU compiler. Printed per chip: parameter, optimizer and
activation/temporary memory against HBM, and FLOPs per step from the compiled executable's
`cost_analysis()`. Exit status 1 (with what to change) when it does not fit.

Topologies: `v4-N`, `v5p-N` (N = TensorCores, 2 per chip), `v5e-N`, `v6e-N` (N = chips), or
libtpu's own form `v5e:4x8`, `v4:2x2x4`. The model is `--preset` if given, else the config's:
`init_from='fft:<name>'`, an fft workdir (`model.json`) or HF directory (`config.json`), or
`model.preset` when training from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from fft import config_lib

_FLAGS: dict = {}


def _define_flags() -> None:
    """Command-line flags, defined only when run as a program: `config` is also fft.main's."""
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Method config file.", lock_config=True
    )
    _FLAGS["topology"] = flags.DEFINE_string(
        "topology", None, "TPU slice, e.g. v5e-256, v4-128, v5p:4x4x8."
    )
    _FLAGS["preset"] = flags.DEFINE_string(
        "preset", None, "Model preset to compile (overrides the config's)."
    )
    _FLAGS["num_slices"] = flags.DEFINE_integer(
        "num_slices", 1, "Slices joined over DCN (multislice)."
    )
    _FLAGS["json"] = flags.DEFINE_bool("json", False, "Print one JSON object, not the table.")
    flags.mark_flags_as_required(["config", "topology"])


GiB = 1024**3


class CompileError(config_lib.FFTError):
    """The topology or config cannot be compiled here."""


# =============================================================================================
# TPU generations and slice names
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class Chip:
    libtpu_name: str  # the generation as libtpu spells it in a topology name
    hbm_bytes: int  # HBM per chip (= per JAX device: v4/v5p run both cores as one megacore)
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip, from the published specs
    dims: int  # 2 (torus of chips in a plane) or 3
    cores_in_name: bool  # `v4-8` counts TensorCores (2 per chip); `v5e-8` counts chips


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 3, True),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 3, True),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 2, False),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 2, False),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it
    chip: Chip
    generation: str
    shape: tuple[int, ...]  # chips per torus dimension

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _shape_for(chips: int, dims: int, name: str) -> tuple[int, ...]:
    """The standard slice shape of `chips` chips (Cloud TPU's v4/v5p/v5e/v6e slice tables)."""
    if not _power_of_two(chips):
        raise CompileError(
            f"topology {name!r}: {chips} chips has no standard shape here; give the shape "
            "explicitly, e.g. 'v5p:4x4x12'."
        )
    if dims == 2:
        x = 2 ** (int(math.log2(chips)) // 2)
        return (x, chips // x)
    if chips < 8:
        return {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1)}[chips]
    shape = [2, 2, 2]
    axis = 2
    while math.prod(shape) < chips:  # grow z, then y, then x: 2x2x4, 2x4x4, 4x4x4, 4x4x8 ...
        shape[axis] *= 2
        axis = (axis - 1) % 3
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """`v5e-256` / `v4-128` / `v5p:4x4x8` -> Topology.

    Raises:
      CompileError: an unknown generation or a size without a standard shape.
    """
    text = name.strip().lower()
    if ":" in text:
        gen, _, dims = text.partition(":")
        gen = _ALIASES.get(gen, gen)
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            raise CompileError(
                f"topology {name!r}: the shape must look like 4x8 or 2x2x4."
            ) from None
    else:
        gen, _, size = text.rpartition("-")
        gen = _ALIASES.get(gen, gen)
        if gen not in CHIPS or not size.isdigit():
            raise CompileError(
                f"unknown topology {name!r}; use e.g. v5e-256, v6e-64, v4-128, v5p-512 or "
                "libtpu's form v5e:16x16."
            )
        chip = CHIPS[gen]
        chips = int(size) // 2 if chip.cores_in_name else int(size)
        shape = _shape_for(max(chips, 1), chip.dims, name)
    if gen not in CHIPS:
        raise CompileError(f"unknown TPU generation {gen!r} in {name!r}; known: {sorted(CHIPS)}.")
    if len(shape) != CHIPS[gen].dims:
        raise CompileError(f"topology {name!r}: {gen} slices have {CHIPS[gen].dims} dimensions.")
    return Topology(name, CHIPS[gen], gen, shape)


def topology_devices(topo: Topology, num_slices: int = 1) -> list:
    """Compile-only devices of the slice (needs libtpu; no TPU attached)."""
    from jax.experimental import topologies

    # Compiling opens no TPU, so it need not hold libtpu's one-process-per-host lock (a run or
    # another fft.compile may hold it); libtpu reads these when it is first loaded.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not a TPU VM: no metadata server
    three_d = topo.chip.dims == 3
    kwargs = dict(
        chip_config_name="megacore" if three_d else "default",
        chips_per_host_bounds=(2, 2, 1) if topo.chips >= 4 else (1, 1, 1),
        num_slices=num_slices,
    )
    try:
        return list(topologies.get_topology_desc(topo.libtpu_name, "tpu", **kwargs).devices)
    except RuntimeError as e:
        if "not installed" in str(e) or "TPU support" in str(e):
            raise CompileError(
                "fft.compile needs libtpu (the TPU compiler) but it is not installed: "
                "`pip install -e '.[tpu]'` (or `pip install libtpu`); no TPU is needed."
            ) from None
        raise CompileError(f"libtpu could not make topology {topo.libtpu_name!r}: {e}") from None


# =============================================================================================
# The model and the train step, as the Trainer assembles them (fft.train.trainer.prepare)
# =============================================================================================


def model_config_for(config, preset: str | None = None):
    """The ModelConfig to compile: `preset`, else the one `config` would train."""
    from fft.models import presets
    from fft.models.config import ModelConfig

    if preset:
        mc = presets.get_preset(preset)
    elif not config.init_from:
        mc = presets.get_preset(config.model.preset)
    elif config.init_from.startswith("fft:"):
        name = config.init_from.removeprefix("fft:")
        name = config_lib.SFT_MODELS.get(name, name)  # fft:tiny-sft has fft:tiny's shape
        mc = presets.get_preset(config_lib.BASE_MODELS.get(name, (name,))[0])
    elif os.path.exists(os.path.join(config.init_from, "model.json")):
        with open(os.path.join(config.init_from, "model.json")) as f:
            mc = ModelConfig.from_dict(json.load(f))
    elif os.path.exists(os.path.join(config.init_from, "config.json")):
        from fft.interop import hf_config

        with open(os.path.join(config.init_from, "config.json")) as f:
            mc = hf_config.config_from_hf(json.load(f))
    else:
        raise CompileError(
            f"init_from={config.init_from!r}: no model.json / config.json there; pass --preset."
        )
    if config.seq_len > mc.max_seq_len:
        mc = mc.replace(max_seq_len=config.seq_len)
    from fft.train import lm

    # The run's options as a TPU run applies them: `auto` dtypes resolve for the TPU.
    return lm.runtime_options(mc, config, platform="tpu")


def lower_train_step(config, model_config, devices):
    """Lowers `config`'s method's train step for `devices`: the method's Recipe with an
    abstract base (no weights, no data) through `fft.train.trainer.prepare`, the assembly the
    Trainer runs. Returns `(lowered, prepared, recipe, batch_spec)`."""
    import importlib

    from fft import sharding
    from fft.train import lm, trainer

    method = importlib.import_module(f"fft.methods.{config.method}")
    # The weights are never read: a loader that loads nothing stands in for init_from's.
    base = lm.Base(model_config, None, lambda abstract, shardings=None: None)
    recipe = method.recipe(config, base=base)
    loop = trainer.LoopConfig.from_config(config)
    mesh = loop.make_mesh(devices)
    spec = recipe.batch_spec(loop.batch_size)
    with sharding.use_mesh(mesh, loop.rules):
        prep = trainer.prepare(recipe, loop, mesh)
        lowered = prep.lower(spec)
    return lowered, prep, recipe, spec


def extra_model_bytes(recipe, mesh, rules) -> dict[str, int]:
    """Per-chip bytes of each of `recipe.extra_models` (reference, reward, ...) placed as the
    Trainer places them: the same rules, so an 8B reference is sharded like the policy."""
    from flax import nnx

    from fft import sharding

    out = {}
    with sharding.use_mesh(mesh, rules):
        for name, spec in recipe.extra_models.items():
            abstract = nnx.state(nnx.eval_shape(spec.build))
            shardings = sharding.state_shardings(abstract, mesh, rules)
            out[name] = per_chip_bytes(sharding.with_shardings(abstract, shardings))
    return out


# =============================================================================================
# Report
# =============================================================================================


def _flat(tree) -> list[tuple[str, object]]:
    """`(path, leaf)` pairs of a pytree, paths as strings."""
    import jax

    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def per_chip_bytes(tree) -> int:
    """Bytes of the largest shard of each leaf, summed: what one chip holds of `tree`."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def analyse(compiled, abstract_state, topo: Topology, config, model_config, *, extra=None,
            tokens=None, value_head=0) -> dict:  # fmt: skip
    """Memory per chip and FLOPs per step of a compiled train step (JSON-able).

    `extra`: per-chip bytes of the models beside the policy (resident beside the step);
    `tokens`: token positions of one global batch (all sequence fields: pairs count twice);
    `value_head`: per-chip bytes of the PPO value head (inside the params).
    """
    extra = dict(extra or {})

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params = per_chip_bytes((abstract_state.params, abstract_state.frozen))
    optimizer = per_chip_bytes(abstract_state.opt_state)
    args = int(mem.argument_size_in_bytes)
    out = int(mem.output_size_in_bytes)
    alias = int(mem.alias_size_in_bytes)
    temp = int(mem.temp_size_in_bytes)
    code = int(getattr(mem, "generated_code_size_in_bytes", 0))
    # Donated state aliases its outputs, so arguments + outputs - aliased is what stays resident.
    total = args + out - alias + temp + code
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    total = max(total, peak) + sum(extra.values())
    from fft.train.state import count_model_params

    # Weights, not storage: a QLoRA code byte holding two nf4 weights counts as two.
    n_trainable = count_model_params(abstract_state.params)
    n_params = n_trainable + count_model_params(abstract_state.frozen)
    tokens = tokens or config.batch_size * config.seq_len
    mc = model_config
    attn = 6 * mc.n_layers * mc.n_heads * mc.head_dim * config.seq_len  # per token, causal
    # fwd 2N + activation grads 2N + weight grads 2N of the trainable part only (LoRA: ~4N).
    model_flops = tokens * (4 * n_params + 2 * n_trainable + attn)
    flops_chip = float(cost.get("flops", 0.0)) if cost else 0.0
    return {
        "topology": topo.name,
        "libtpu_topology": topo.libtpu_name,
        "chips": topo.chips,
        "device_kind": "",
        "model": {k: getattr(mc, k) for k in ("d_model", "n_layers", "n_heads", "vocab_size")},
        "params": n_params,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "mesh": {},
        "dtype": mc.dtype,
        "param_dtype": mc.param_dtype,
        "quant": mc.quant,
        "method": config.method,
        "lora_rank": int(config.lora.rank),
        "attention": mc.attention,
        "remat": mc.remat,
        "scan_layers": mc.scan_layers,
        "per_chip_bytes": {
            "params": params,
            "optimizer": optimizer,
            "batch_and_other_args": max(args - params - optimizer, 0),
            "activations_temp": temp,
            "code": code,
            "value_head": value_head,
            "extra_models": extra,
            "total": total,
            "hbm": topo.chip.hbm_bytes,
        },
        "fits": total <= topo.chip.hbm_bytes,
        "flops_per_step_per_chip": flops_chip,
        "flops_per_step": flops_chip * topo.chips,
        "model_flops_per_step": float(model_flops),
        "peak_flops_per_chip": topo.chip.peak_bf16_flops,
        "step_s_at_100pct_mfu": model_flops / (topo.chips * topo.chip.peak_bf16_flops),
    }


def _gib(x: float) -> str:
    return f"{x / GiB:9.3f} GiB"


def format_report(r: dict) -> str:
    m = r["per_chip_bytes"]
    lines = [
        f"fft.compile: {r.get('method', '?')} on {r['topology']} ({r['libtpu_topology']}, "
        f"{r['chips']} chips, "
        f"{r['device_kind']}), mesh {r['mesh']}",
        f"  model {r['model']} = {r['params'] / 1e6:,.1f}M params; batch {r['batch_size']} x "
        f"seq {r['seq_len']}; dtype {r['dtype']}, params {r['param_dtype']}, quant {r['quant']}, "
        f"lora rank {r['lora_rank']}, attention {r['attention']}, remat {r['remat']}, "
        f"scan {r['scan_layers']}",
        "  memory per chip:",
        f"    params              {_gib(m['params'])}",
        f"    optimizer state     {_gib(m['optimizer'])}",
        f"    batch + other args  {_gib(m['batch_and_other_args'])}",
        f"    activations / temp  {_gib(m['activations_temp'])}",
        f"    code                {_gib(m['code'])}",
        *(
            [f"    (value head         {_gib(m['value_head'])}, inside params)"]
            if m.get("value_head")
            else []
        ),
        *(f"    {k + ' model':<19} {_gib(v)}" for k, v in m.get("extra_models", {}).items()),
        *(
            ["    reference model         0.000 GiB  (the policy with its LoRA adapters off)"]
            if r.get("reference_shared")
            else []
        ),
        f"    total               {_gib(m['total'])}  of {_gib(m['hbm']).strip()} HBM "
        f"({100 * m['total'] / m['hbm']:.0f}%)",
        "  FLOPs per step:",
        f"    compiled, per chip  {r['flops_per_step_per_chip']:.3e}  (XLA cost analysis)",
        f"    compiled, all chips {r['flops_per_step']:.3e}",
        f"    model (4N+2N_train+attn) {r['model_flops_per_step']:.3e}",
        *(
            ["    (scan_layers: XLA counts the scanned layer body once; trust the model figure)"]
            if r["scan_layers"]
            else []
        ),
        f"    step time at 100% MFU: {r['step_s_at_100pct_mfu'] * 1e3:.1f} ms "
        f"(peak {r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 per chip)",
        "  FITS" if r["fits"] else "  DOES NOT FIT",
    ]
    return "\n".join(lines)


_ADVICE = (
    "To fit: shard params and optimizer over more chips (--config.mesh.data=1 "
    "--config.mesh.fsdp=-1), recompute activations (--config.model.remat=full or dots), compute "
    "in bf16 (--config.model.dtype=bfloat16), lower --config.batch_size or --config.seq_len, "
    "or accumulate gradients (--config.optim.grad_accum=k)."
)


def compile_for_topology(
    config, topology: str, *, preset=None, model_config=None, num_slices=1
) -> dict:
    """Compiles `config`'s train step for `topology`; returns the report dict.

    Args:
      config: a method config (ConfigDict) of any method.
      topology: a TPU slice name (see `parse_topology`).
      preset: model preset name overriding the config's model.
      model_config: a ModelConfig overriding both (used as given).
      num_slices: slices joined over DCN.

    Raises:
      CompileError: libtpu missing, unknown topology, or the TPU
        compiler ran out of HBM (the message carries its numbers and what to change).
    """
    config_lib.validate(config)
    topo = parse_topology(topology)
    devices = topology_devices(topo, num_slices)
    if model_config is None:
        model_config = model_config_for(config, preset)
    lowered, prep, recipe, spec = lower_train_step(config, model_config, devices)
    mesh = prep.mesh
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA reports OOM as a generic runtime error
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg or "memory" in msg.lower():
            first = next((ln for ln in msg.splitlines() if "memory" in ln.lower()), msg[:400])
            raise CompileError(
                f"does not fit on {topo.name}: the TPU compiler ran out of HBM: {first.strip()}\n"
                + _ADVICE
            ) from None
        raise
    state = prep.abstract_state
    head = [v for p, v in _flat(state.params) if "value_head" in p]
    report = analyse(
        compiled,
        state,
        topo,
        config,
        model_config,
        extra=extra_model_bytes(recipe, mesh, prep.rules),
        tokens=sum(math.prod(v.shape) for k, v in spec.items() if k.endswith("tokens")),
        value_head=per_chip_bytes(head),
    )
    if config.method in ("dpo", "rlhf") and "reference" not in recipe.extra_models:
        report["reference_shared"] = True  # LoRA: the policy with its adapters off
    report["mesh"] = dict(mesh.shape)
    report["device_kind"] = devices[0].device_kind
    return report


def main(argv):
    del argv
    # Compile-only devices come from libtpu; computation stays on CPU, and libtpu must not go
    # looking for a GCE metadata server on a machine that is not a TPU VM.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    import jax

    jax.config.update("jax_platforms", "cpu")
    try:
        report = compile_for_topology(
            _FLAGS["config"].value,
            _FLAGS["topology"].value,
            preset=_FLAGS["preset"].value,
            num_slices=_FLAGS["num_slices"].value,
        )
    except config_lib.FFTError as e:
        print(f"fft.compile: error: {e}", file=sys.stderr)
        sys.exit(2 if not str(e).startswith("does not fit") else 1)
    print(json.dumps(report) if _FLAGS["json"].value else format_report(report), flush=True)
    if not report["fits"]:
        total, hbm = report["per_chip_bytes"]["total"], report["per_chip_bytes"]["hbm"]
        print(
            f"fft.compile: does not fit: {total / GiB:.2f} GiB per chip > {hbm / GiB:.0f} GiB "
            f"HBM on {report['topology']}. {_ADVICE}",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
