"""Meshes, logical-axis rules, shardings for pytrees, batch placement.

Model code names *logical* axes (`('embed', 'mlp')` on a kernel, `('batch', 'length',
'act_embed')` on an activation); only the rules here (from `config.sharding.rules`) map them to
the mesh axes `('data', 'fsdp', 'tensor')`. Data parallel, FSDP and tensor parallel are therefore
config changes: `mesh.data=8`, `mesh.fsdp=8`, `mesh.tensor=4`, or any product of them.

Rules are a sequence of `(logical_name, mesh_axis)` pairs (or a mapping) where `mesh_axis` is a
mesh axis name, a tuple of them, or None (replicated). Names without a rule are replicated.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fft.config_lib import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# The documented default (docs/architecture.md). `norm`, `head_dim`, `layers`, `length` and
# `act_embed` stay replicated: sharding them costs more communication than it saves.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
)

Rules = Sequence[tuple[str, Any]] | Mapping[str, Any]

# ---------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _mesh_fix(sizes: list[int], n: int) -> str:
    """A concrete `--config.mesh.<axis>=<value>` that makes `sizes` fit `n` devices.

    Tries each axis the user set (not 1, not -1) in turn, keeping the others; the first axis
    that some value fixes is named. Falls back to data=-1 with the other axes at 1.
    """
    for i in range(len(sizes) - 1, -1, -1):  # tensor, fsdp, data: the rarer settings first
        if sizes[i] in (1, -1):
            continue
        others = math.prod(s for j, s in enumerate(sizes) if j != i and s != -1)
        if n % others:
            continue
        fill = -1 in sizes[:i] + sizes[i + 1 :]
        room = n // others
        # With another axis at -1 (filling the rest) any divisor of the room fits: keep the
        # largest one not above what was asked for; without one, the value is forced.
        value = max(d for d in _divisors(room) if d <= sizes[i]) if fill else room
        choices = f" (a divisor of {room}: {', '.join(map(str, _divisors(room)))})" if fill else ""
        return f"--config.mesh.{MESH_AXES[i]}={value}{choices}"
    return "--config.mesh.data=-1 --config.mesh.fsdp=1 --config.mesh.tensor=1"


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """Builds the `('data', 'fsdp', 'tensor')` mesh.

    Args:
      data, fsdp, tensor: axis sizes; at most one may be -1, meaning "all remaining devices".
      devices: the devices to use (default: `jax.devices()`, every device of every process).

    Returns:
      A `jax.sharding.Mesh` with Auto axis types (GSPMD propagates shardings between the
      constraints we place).

    Raises:
      ConfigError: when the sizes do not multiply to the device count; the message names the
        axes set, the device count and a value that fits.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [int(data), int(fsdp), int(tensor)]
    given = ", ".join(f"config.mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ConfigError(
            f"{given}: at most one of data/fsdp/tensor may be -1 (fill the remaining devices)."
        )
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"{given}: mesh sizes must be positive or -1 (fill).")
    fixed = math.prod(s for s in sizes if s != -1)
    devs = f"{n} device{'s' if n != 1 else ''}"
    if -1 in sizes:
        if n % fixed:
            raise ConfigError(
                f"{given} does not fit the {devs}: the fixed sizes (product {fixed}) must divide "
                f"{n}. Use {_mesh_fix(sizes, n)}."
            )
        sizes[sizes.index(-1)] = n // fixed
    if math.prod(sizes) != n:
        raise ConfigError(
            f"{given} does not fit the {devs}: data*fsdp*tensor = "
            f"{'*'.join(map(str, sizes))} = {math.prod(sizes)} must equal {n}. "
            f"Use {_mesh_fix([int(data), int(fsdp), int(tensor)], n)}, or -1 for one axis to "
            "fill the rest."
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(mesh_cfg) -> Mesh:
    """`make_mesh` from a `config.mesh` ConfigDict / dict with keys data, fsdp, tensor."""
    get = mesh_cfg.get if hasattr(mesh_cfg, "get") else lambda k, d: getattr(mesh_cfg, k, d)
    return make_mesh(data=get("data", -1), fsdp=get("fsdp", 1), tensor=get("tensor", 1))


# ---------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec
# ---------------------------------------------------------------------------------------------


def _rules_dict(rules: Rules | None) -> dict[str, Any]:
    if rules is None:
        rules = DEFAULT_RULES
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = {}
    for item in items:
        try:
            name, axis = item
        except (TypeError, ValueError):
            raise ConfigError(
                f"sharding.rules: each rule must be a (logical_name, mesh_axis) pair, got {item!r}."
            ) from None
        if isinstance(axis, list):
            axis = tuple(axis)
        for a in axis if isinstance(axis, tuple) else (axis,):
            if a is not None and a not in MESH_AXES:
                raise ConfigError(
                    f"sharding.rules: rule {name!r} -> {axis!r} names an unknown mesh axis "
                    f"{a!r}; mesh axes are {MESH_AXES}."
                )
        out.setdefault(name, axis)  # first rule for a name wins (flax convention)
    return out


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules: Rules | None = None):
    """Maps logical axis names to a PartitionSpec of mesh axes.

    A mesh axis is used at most once per spec: a later logical axis that maps to an axis already
    used is left unsharded there (e.g. `('embed', 'embed')` -> `P('fsdp', None)`).

    Args:
      logical_axes: one name (or None) per array dimension; None -> fully replicated.
      rules: `(logical, mesh_axis)` pairs or a mapping; default `DEFAULT_RULES`.

    Returns:
      A `jax.sharding.PartitionSpec`.
    """
    if logical_axes is None:
        return PartitionSpec()
    table = _rules_dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        axis = table.get(name) if name is not None else None
        axes = axis if isinstance(axis, tuple) else (axis,) if axis is not None else ()
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


log = logging.getLogger(__name__)

# Replications already reported (see `_fit_spec`), so each is logged once per process.
_WARNED: set[tuple] = set()


def _fit_spec(
    spec: PartitionSpec,
    shape: Sequence[int],
    mesh: Mesh,
    *,
    name: str | None = None,
    logical_axes: Sequence[str | None] | None = None,
) -> PartitionSpec:
    """Drops mesh axes from dims they do not divide (those dims stay replicated instead).

    Why: e.g. 2 kv heads on tensor=4, or a vocab of 50257 on tensor=2 — replicating that one
    dim is correct, where an uneven sharding is an XLA error. It is not free (every device
    holds, and for activations computes, the whole dim), so it is logged as a warning once per
    (logical axis or shape, dim size, mesh axis): per layer or per optimizer moment it would
    repeat the same news.

    Args:
      spec: the spec the rules give.
      shape: the array's shape.
      mesh: the mesh.
      name: what the array is, for the warning ('embed.embedding', 'activation (...)').
      logical_axes: the array's logical axis names, for the warning and its once-only key.

    Returns:
      `spec` without the axes that do not divide their dim.
    """
    out = []
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = entry if isinstance(entry, tuple) else (entry,) if entry is not None else ()
        kept = []
        for a in axes:
            if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                kept.append(a)
            else:
                _warn_replicated(name, shape, logical_axes, i, tuple(kept), a, mesh)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def _warn_replicated(name, shape, logical_axes, dim, kept, axis, mesh) -> None:
    """Logs, once per key, that dim `dim` of an array is replicated over mesh axis `axis`."""
    logical = logical_axes[dim] if logical_axes is not None and dim < len(logical_axes) else None
    key = (logical or tuple(shape), shape[dim], kept, axis, mesh.shape[axis])
    if key in _WARNED:
        return
    _WARNED.add(key)
    shards = math.prod(mesh.shape[k] for k in (*kept, axis))
    over = f"mesh axis {axis!r} (size {mesh.shape[axis]})"
    if kept:  # a dim sharded over several axes: `axis` is the one that no longer fits
        over += f" after {', '.join(map(repr, kept))} ({shards} shards in all)"
    log.warning(
        "sharding: %s %s: dim %d (%s, size %d) does not divide over %s, so it is replicated "
        "over %r (each device holds all of it). A size that is a multiple of %d "
        "would shard it. (Logged once for all arrays with this dim.)",
        name or "array",
        tuple(shape),
        dim,
        repr(logical) if logical else "no logical name",
        shape[dim],
        over,
        axis,
        shards,
    )


def named_sharding(mesh: Mesh, logical_axes, shape=None, rules: Rules | None = None, *, name=None):
    """NamedSharding for logical axes; with `shape`, non-dividing axes are dropped (and logged,
    naming the array as `name`)."""
    spec = logical_to_spec(logical_axes, rules)
    if shape is not None:
        spec = _fit_spec(spec, shape, mesh, name=name, logical_axes=logical_axes)
    return NamedSharding(mesh, spec)


def rules_from_config(overrides: Rules | None = None) -> tuple[tuple[str, Any], ...]:
    """`config.sharding.rules` (overrides, first match wins) followed by `DEFAULT_RULES`."""
    items = list(overrides.items() if isinstance(overrides, Mapping) else overrides or ())
    merged = tuple(tuple(x) for x in items) + DEFAULT_RULES
    _rules_dict(merged)  # validates, naming a bad rule
    return merged


# ---------------------------------------------------------------------------------------------
# The active (mesh, rules) context used by model code
# ---------------------------------------------------------------------------------------------

_CONTEXT = threading.local()


def current() -> tuple[Mesh, dict] | None:
    """The `(mesh, rules)` installed by the innermost `use_mesh`, or None."""
    stack = getattr(_CONTEXT, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | None = None) -> Iterator[Mesh]:
    """Makes `constrain` active: activations get sharding constraints from `rules` on `mesh`.

    Constraints are baked in when a jitted function is *traced*, so trace (first call) inside
    this context.
    """
    stack = getattr(_CONTEXT, "stack", None)
    if stack is None:
        stack = _CONTEXT.stack = []
    stack.append((mesh, _rules_dict(rules)))
    try:
        yield mesh
    finally:
        stack.pop()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint(x, rules(logical_axes))` inside `use_mesh`; else returns `x`."""
    ctx = current()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = _fit_spec(
        logical_to_spec(logical_axes, rules),
        x.shape,
        mesh,
        name=f"activation {tuple(logical_axes)}",
        logical_axes=logical_axes,
    )
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------------------------
# Shardings for state pytrees
# ---------------------------------------------------------------------------------------------


def _logical_names(variable: nnx.Variable):
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def state_shardings(tree, mesh: Mesh, rules: Rules | None = None):
    """NamedShardings for an (abstract) nnx.State or any pytree holding nnx Variables.

    Variables carry logical names in their metadata (`nnx.Param(v, sharding_names=...)`, stored
    as `out_sharding`); those map through `rules`. Plain leaves (optimizer counters, rng keys)
    and Variables without names are replicated. Axes that do not divide a dim are dropped.

    Args:
      tree: an nnx.State / pytree of Variables whose values have `.shape` (arrays or
        ShapeDtypeStructs), e.g. from `nnx.eval_shape` or `jax.eval_shape`.
      mesh: the mesh.
      rules: logical-axis rules.

    Returns:
      A pytree of the same structure with `NamedSharding` leaves (usable as jit shardings).
    """
    rules = _rules_dict(rules)

    def leaf_sharding(x, names=None, path=()):
        shape = getattr(x, "shape", ())
        if not names:
            return NamedSharding(mesh, PartitionSpec())
        name = ".".join(str(_path_key(k)) for k in path)
        spec = _fit_spec(logical_to_spec(names, rules), shape, mesh, name=name, logical_axes=names)
        return NamedSharding(mesh, spec)

    def one(path, x):
        if isinstance(x, nnx.Variable):
            names = _logical_names(x)
            return x.replace(value=leaf_sharding(x.get_value(), names, path))
        return leaf_sharding(x)

    return jax.tree_util.tree_map_with_path(
        one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def _path_key(k):
    """The plain key of a pytree path entry (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def with_shardings(abstract_tree, shardings):
    """Attaches shardings to an abstract (ShapeDtypeStruct) tree, for orbax restore targets."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
    )


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Batch dim split over `('data', 'fsdp')`; the other `ndim - 1` dims replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ConfigError unless the global batch splits evenly over data*fsdp and processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        fits = -(-batch_size // shards) * shards  # the next multiple up
        raise ConfigError(
            f"config.batch_size={batch_size} does not divide over mesh.data*mesh.fsdp = "
            f"{mesh.shape['data']}*{mesh.shape['fsdp']} = {shards} devices. Use "
            f"--config.batch_size={fits} (a multiple of {shards}), or change config.mesh."
        )
    if batch_size % jax.process_count():
        raise ConfigError(
            f"batch_size={batch_size} does not divide over {jax.process_count()} processes."
        )


def check_model_fits(model_config: Any, mesh: Mesh) -> None:
    """Raises ConfigError when the attention heads cannot split over `mesh.tensor`.

    Query heads must divide over `tensor` (else attention, the point of tensor parallelism,
    runs replicated on every device). KV heads may be fewer than `tensor` when `tensor` is a
    multiple of them (grouped-query attention then replicates each KV head over its group), but
    not a ragged count (3 KV heads on tensor=2).

    Args:
      model_config: has `n_heads` / `n_kv_heads` (models without them are not checked).
      mesh: the mesh.
    """
    tensor = mesh.shape["tensor"]
    heads = getattr(model_config, "n_heads", None)
    kv = getattr(model_config, "n_kv_heads", None) or heads
    if tensor == 1 or not heads:
        return
    fits = [t for t in _divisors(heads) if mesh.size % t == 0 and (kv % t == 0 or t % kv == 0)]
    fix = f"Use --config.mesh.tensor={max(fits)} (one of {', '.join(map(str, fits))})."
    if heads % tensor:
        raise ConfigError(
            f"config.mesh.tensor={tensor} does not divide the model's {heads} attention heads. "
            + fix
        )
    if kv % tensor and tensor % kv:
        raise ConfigError(
            f"config.mesh.tensor={tensor} does not split the model's {kv} KV heads (neither "
            f"divides the other). " + fix
        )


def put_batch(batch_np: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this process's slice of a batch on the mesh as global arrays.

    Each process passes only its own rows (`global_batch // process_count`); the global shape
    is the concatenation over processes. On one process this is a plain sharded `device_put`.

    Args:
      batch_np: dict of numpy arrays with the (process-local) batch as the leading dim.
      mesh: the mesh.

    Returns:
      dict of global `jax.Array`s, batch dim sharded over `('data', 'fsdp')`.
    """
    out = {}
    for key, value in batch_np.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ConfigError(f"batch field {key!r} is a scalar; every field needs a batch dim.")
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        sharding = batch_sharding(mesh, value.ndim)
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


# ---------------------------------------------------------------------------------------------
# Host data in and out of computations that span processes (evals, generation, rollouts)
# ---------------------------------------------------------------------------------------------


def mesh_of(tree) -> Mesh | None:
    """The mesh of the first array of `tree` placed on a multi-device `NamedSharding`, or None.

    Evals and rollouts place their inputs where the model lives: a model sharded over a mesh
    (the train state inside the loop) gets inputs sharded over the same mesh; a model on one
    device (a reference built outside the loop, a test's model) gets plain arrays, as before.
    """
    for leaf in jax.tree.leaves(tree):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def put_like(tree_np, like) -> Any:
    """Places host arrays that every process holds in full for a computation with `like`.

    Args:
      tree_np: pytree of numpy arrays, the same values on every process (eval batches, prompts).
      like: the model (or its state) the arrays will meet inside a jitted function.

    Returns:
      With `like` on a multi-device mesh: global arrays on that mesh, the leading (batch) dim
      split over `('data', 'fsdp')` where it divides, else replicated. Otherwise `jnp` arrays
      (uncommitted, as `jnp.asarray` gives).
    """
    mesh = mesh_of(like)
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, tree_np)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(x):
        x = np.asarray(x)
        spec = PartitionSpec()
        if x.ndim and x.shape[0] % shards == 0:
            spec = PartitionSpec(("data", "fsdp"), *([None] * (x.ndim - 1)))
        s = NamedSharding(mesh, spec)
        # Every process holds the whole array: each hands over the slices of its own devices.
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, tree_np)


def to_host(tree) -> Any:
    """numpy copies of the arrays of `tree`, also of arrays that span several processes.

    A sharded output of a computation over a multi-process mesh holds rows on other hosts:
    `np.asarray` on it fails. Those are gathered (`process_allgather`, a collective, so every
    process must call this in the same order); local and replicated arrays are copied as is.
    """
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)
