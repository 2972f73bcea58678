"""Optimizers and learning-rate schedules from `config.optim`.

    tx = clip_by_global_norm(clip_norm)            (clip_norm > 0)
       -> optimizer(name, lr=schedule, weight decay masked to >=2-D params)
       -> scale each update by its path's lr multiplier (lr_multiplier_fn, e.g. layer-wise decay)

Gradient accumulation is done inside the train step (a `lax.scan` over microbatches, see
`fft.train.step`), not with `optax.MultiSteps`: one optimizer update per step keeps the
schedule in optimizer steps and keeps XLA's buffers small.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fft.config_lib import ConfigError
from fft.train.state import param_path

SCHEDULES = ("constant", "warmup_cosine", "wsd", "rewarm", "linear")
OPTIMIZERS = ("adamw", "adafactor", "sgd", "lion")

# ---------------------------------------------------------------------------------------------
# Schedules. Each returns an optax schedule `step -> lr`; warmup is linear from 0.
# ---------------------------------------------------------------------------------------------


def _warmup(step, lr, warmup_steps):
    if warmup_steps <= 0:
        return jnp.asarray(lr, jnp.float32)
    return lr * jnp.minimum(1.0, (step + 1.0) / warmup_steps)


def _cosine(frac, lr, min_lr):
    """lr at `frac` in [0, 1] of a cosine decay from lr to min_lr."""
    frac = jnp.clip(frac, 0.0, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(math.pi * frac))


def make_schedule(
    name: str,
    lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    decay_steps: int = 0,
    min_lr_ratio: float = 0.0,
    stable_fraction: float = 0.8,
    rewarm_steps: Sequence[int] = (),
) -> optax.Schedule:
    """Learning-rate schedule by name.

    With w = warmup_steps, lr_min = min_lr_ratio * lr, and D = decay_steps (0: to total_steps):
      constant:      lr * min(1, (s+1)/w)
      linear:        warmup, then linear from lr to lr_min over D steps after warmup
      warmup_cosine: warmup, then lr_min + (lr - lr_min) * (1 + cos(pi * (s - w) / D)) / 2
      wsd:           warmup, stable at lr, then linear decay to lr_min over the last D steps
                     (D = 0: the last (1 - stable_fraction) of the steps after warmup)
      rewarm:        cycles start at 0 and at each step in rewarm_steps; every cycle re-warms
                     over w steps from 0 and cosine-decays to lr_min at the cycle's end
                     (continual pre-training: a new data era starts a new cycle)
    (Warmup uses s+1 so that step 0 already trains at lr/w rather than 0.)

    Returns:
      A callable step -> lr (jittable).
    """
    w = int(warmup_steps)
    min_lr = lr * float(min_lr_ratio)
    total = max(int(total_steps), 1)
    decay = int(decay_steps) if decay_steps else max(total - w, 1)

    if name == "constant":
        return lambda s: _warmup(s, lr, w)
    if name == "linear":

        def linear(s):
            frac = jnp.clip((s - w) / decay, 0.0, 1.0)
            return jnp.where(s < w, _warmup(s, lr, w), lr + (min_lr - lr) * frac)

        return linear
    if name == "warmup_cosine":
        return lambda s: jnp.where(s < w, _warmup(s, lr, w), _cosine((s - w) / decay, lr, min_lr))
    if name == "wsd":
        if decay_steps:
            decay_len = int(decay_steps)
        else:
            decay_len = max(round((total - w) * (1.0 - float(stable_fraction))), 1)
        decay_start = total - decay_len

        def wsd(s):
            frac = jnp.clip((s - decay_start) / decay_len, 0.0, 1.0)
            return jnp.where(s < w, _warmup(s, lr, w), lr + (min_lr - lr) * frac)

        return wsd
    if name == "rewarm":
        starts = [0] + sorted(int(b) for b in rewarm_steps if 0 < int(b) < total)
        ends = starts[1:] + [total]
        starts_a, ends_a = jnp.asarray(starts), jnp.asarray(ends)

        def rewarm(s):
            k = jnp.sum(s >= starts_a) - 1  # current cycle
            start, end = starts_a[k], ends_a[k]
            local = s - start
            frac = (local - w) / jnp.maximum(end - start - w, 1)
            return jnp.where(local < w, _warmup(local, lr, w), _cosine(frac, lr, min_lr))

        return rewarm
    raise ConfigError(f"optim.schedule={name!r} is not one of {SCHEDULES}.")


# ---------------------------------------------------------------------------------------------
# Masks and per-path multipliers
# ---------------------------------------------------------------------------------------------


def _is_variable(x):
    return isinstance(x, nnx.Variable)


def decay_mask(params):
    """True where weight decay applies: params with >= 2 dims (not norms, biases, scalars)."""
    return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def path_tree(params):
    """A tree like `params` whose leaves are the params' '.'-joined paths."""
    return jax.tree_util.tree_map_with_path(lambda p, _: param_path(p), params)


def scale_by_path(multipliers) -> optax.GradientTransformation:
    """Multiplies each update by a per-leaf factor (a tree like the params).

    A factor is a float, or a schedule `step -> factor` (jittable; the step is counted in this
    transform's state). Schedules change which params move without recompiling the train step:
    gradual unfreezing gives a group factor 0 until its unfreeze step (fft.methods.transfer).
    """
    scheduled = any(callable(m) for m in jax.tree.leaves(multipliers))

    def init_fn(params):
        del params
        return (
            optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))
            if scheduled
            else optax.EmptyState()
        )

    def update_fn(updates, state, params=None):
        del params
        step = state.count if scheduled else None

        def scale(u, m):
            if callable(m):
                return u * jnp.asarray(m(step), u.dtype)
            return u if m == 1.0 else u * m

        updates = jax.tree.map(scale, updates, multipliers)
        if scheduled:
            state = optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------


def _get(cfg, key, default):
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except AttributeError:
        value = default
    return default if value is None else value


def _multiplier(m):
    return m if callable(m) else float(m)


def make_optimizer(
    optim_cfg,
    total_steps: int,
    params=None,
    lr_multiplier_fn: Callable[[str], float] | None = None,
):
    """Builds the optax chain and its schedule from `config.optim`.

    Args:
      optim_cfg: ConfigDict / dict with keys name, lr, schedule, warmup_steps, decay_steps,
        min_lr_ratio, weight_decay, clip_norm, b1, b2, eps, rewarm_steps, stable_fraction
        (grad_accum is read by the train step, not here).
      total_steps: run length in optimizer steps (for decay-to-end schedules).
      params: the (abstract) trainable params; needed only with `lr_multiplier_fn`.
      lr_multiplier_fn: `path -> float` (e.g. layer-wise lr decay: 'layers.0.…' -> 0.5) or
        `path -> (step -> float)` (e.g. gradual unfreezing); each param's update is scaled by it.

    Returns:
      `(tx, schedule)`: an `optax.GradientTransformation` and the `step -> lr` schedule.
    """
    name = _get(optim_cfg, "name", "adamw")
    lr = float(_get(optim_cfg, "lr", 1e-3))
    schedule = make_schedule(
        _get(optim_cfg, "schedule", "constant"),
        lr,
        total_steps,
        warmup_steps=int(_get(optim_cfg, "warmup_steps", 0)),
        decay_steps=int(_get(optim_cfg, "decay_steps", 0)),
        min_lr_ratio=float(_get(optim_cfg, "min_lr_ratio", 0.0)),
        stable_fraction=float(_get(optim_cfg, "stable_fraction", 0.8)),
        rewarm_steps=list(_get(optim_cfg, "rewarm_steps", ())),
    )
    wd = float(_get(optim_cfg, "weight_decay", 0.0))
    b1 = float(_get(optim_cfg, "b1", 0.9))
    b2 = float(_get(optim_cfg, "b2", 0.95))
    eps = float(_get(optim_cfg, "eps", 1e-8))
    clip = float(_get(optim_cfg, "clip_norm", 0.0))

    if name == "adamw":
        opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)
    elif name == "lion":
        opt = optax.lion(schedule, b1=b1, b2=b2, weight_decay=wd, mask=decay_mask)
    elif name == "adafactor":
        opt = optax.adafactor(
            schedule, weight_decay_rate=wd or None, weight_decay_mask=decay_mask,
            multiply_by_parameter_scale=False,
        )  # fmt: skip
    elif name == "sgd":
        opt = optax.chain(
            optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity(),
            optax.sgd(schedule, momentum=b1 or None),
        )
    else:
        raise ConfigError(f"optim.name={name!r} is not one of {OPTIMIZERS}.")

    parts = []
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(opt)
    if lr_multiplier_fn is not None:
        if params is None:
            raise ValueError("make_optimizer: lr_multiplier_fn needs `params` (for their paths).")
        multipliers = jax.tree.map(lambda p: _multiplier(lr_multiplier_fn(p)), path_tree(params))
        parts.append(scale_by_path(multipliers))
    return optax.chain(*parts), schedule


def layerwise_lr_decay(n_layers: int, decay: float) -> Callable[[str], float]:
    """`path -> multiplier` for discriminative fine-tuning (ULMFiT / BEiT layer-wise decay).

    Layer i (path 'layers.i.…') gets decay**(n_layers - i); embeddings get decay**(n_layers+1);
    everything else (final norm, heads) gets 1.
    """

    def fn(path: str) -> float:
        parts = path.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                return decay ** (n_layers - int(parts[i + 1]))
        if parts[0] in ("embed", "pos_embed", "embeddings"):
            return decay ** (n_layers + 1)
        return 1.0

    return fn
