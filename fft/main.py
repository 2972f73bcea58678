"""Entry point: `python -m fft.main --config=configs/<method>.py[:variant] --workdir=DIR`.

Parses the ml_collections config (with `--config.x.y=value` overrides), validates it before
anything compiles, resolves `init_from` presets (`fft:tiny` is built and cached on first use),
then runs the method's Recipe (`fft.methods.<config.method>.recipe`) on the one Trainer.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fft import config_lib, distributed, paths

_CONFIG = config_flags.DEFINE_config_file("config", None, "Method config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def _overrides(argv: list[str]) -> list[str]:
    """The dotted keys given as `--config.x.y=...` on the command line."""
    keys = []
    for arg in argv:
        if arg.startswith("--config."):
            keys.append(arg[len("--config.") :].split("=", 1)[0])
    return keys


def check_workdir(workdir: str) -> str:
    """The absolute `workdir`; FFTError when it (or a folder above it) is a file.

    Args:
      workdir: the run directory given with --workdir (created later if missing).

    Returns:
      Its absolute path; a URL (`gs://bucket/run`) unchanged (fft.paths), unchecked here.
    """
    if paths.is_url(workdir):
        return paths.workdir_str(workdir)
    path = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise config_lib.FFTError(
            f"--workdir={workdir} is a file, not a directory: give a directory for the run "
            "(a new one is created)."
        )
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise config_lib.FFTError(
            f"--workdir={workdir}: {parent} is a file, so no directory can be made below it; "
            "give another path."
        )
    return path


def finished_results(config, workdir: str) -> dict | None:
    """The `results.json` of `workdir` when it holds a run finished at `config.steps` or later.

    A finished run with fewer steps than `config.steps` is not finished for this config: the
    run continues it (from its last checkpoint) and its new results.json keeps the earlier one
    under `history`.
    """
    path = os.path.join(workdir, "results.json")
    try:
        results = paths.read_json(path)
    except (OSError, ValueError) as e:
        raise config_lib.FFTError(
            f"{path} is unreadable ({e}); move it away to finish the run again."
        ) from None
    if results is None:
        return None
    done = (results.get("config") or {}).get("steps", results.get("steps"))
    if done is not None and int(config.steps) > int(done):
        print(
            f"Continuing the run finished at step {done} in {workdir} to step {config.steps}.",
            flush=True,
        )
        return None
    return results


def _report_finished(results: dict, workdir: str) -> None:
    """Says that `workdir` is already finished and prints its table from results.json."""
    from fft import metrics as metrics_lib  # deferred: imports jax

    steps = results.get("steps", "?")
    print(
        f"run already finished at step {steps}: results in "
        f"{os.path.join(workdir, 'results.json')} (nothing was changed; raise --config.steps to "
        "continue it, or give a new --workdir to start over)",
        flush=True,
    )
    if results.get("before") is not None or results.get("after") is not None:
        print(metrics_lib.format_table(results.get("before") or {}, results.get("after") or {}))


def check_fits(config) -> None:
    """Checks, before any data or model is built, that mesh and batch fit the devices."""
    from fft import sharding  # deferred: imports jax

    mesh = sharding.mesh_from_config(config.mesh)
    sharding.check_batch_size(int(config.batch_size), mesh)


def run(config, workdir: str) -> dict:
    """Validates `config`, resolves `init_from`, runs the method; returns its results dict.

    A workdir that already holds a run finished at `config.steps` (or later) is not touched:
    its results.json is returned (and its table printed). This makes a rerun of a command, or
    of an experiment script that chains runs, redo only what had not finished.
    """
    config_lib.validate(config)
    workdir = check_workdir(workdir)
    finished = finished_results(config, workdir)
    if finished is not None:
        _report_finished(finished, workdir)
        return finished
    check_fits(config)
    from fft import zoo  # deferred: imports jax

    with config.unlocked():
        config.init_from = zoo.resolve(config.init_from)
    method = importlib.import_module(f"fft.methods.{config.method}")
    from fft.train import trainer  # deferred: imports jax

    return trainer.fit(config, workdir, method.recipe(config, workdir))


def run_once(config, workdir: str) -> dict:
    """`run` (kept for experiment scripts): a finished workdir returns its `results.json`.

    With this a rerun after a crash or a kill redoes only the runs that had not finished (an
    unfinished one resumes from its checkpoint).
    """
    return run(config, workdir)


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint step at INFO through absl: hundreds of lines that bury
        # the progress bar and the results table. `--verbosity=0` brings them back.
        logging.set_verbosity(logging.WARNING)
    try:
        # Multi-host: join JAX's distributed runtime before any device is touched (a no-op for
        # a single process; see fft/distributed.py for where the settings come from).
        distributed.initialize_from_flags()
        run(_CONFIG.value, _WORKDIR.value)
    except config_lib.FFTError as e:
        # User errors are one message, not a traceback (DESIGN.md: "faults are loud", not noisy).
        logging.flush()
        print(f"fft: error: {e}", file=sys.stderr)
        sys.exit(2)


def _config_arg(argv: list[str]) -> str | None:
    """The value of `--config=FILE[:VARIANT]` (or `--config FILE`) on the command line."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def entry() -> None:
    """Console-script entry: loads the config and checks override keys before absl parses them.

    ml_collections reports a missing config file, an unknown variant or an unknown override
    key as a traceback deep in flag parsing; loading the file here first turns each into one
    `fft: error:` line naming the thing and the fix.
    """
    argv = sys.argv
    config_arg = _config_arg(argv)
    if config_arg:
        try:
            module_path, _, variant = config_arg.partition(":")
            config = config_lib.load_config(module_path, variant)
            config_lib.check_overrides(config, _overrides(argv))
        except config_lib.FFTError as e:
            print(f"fft: error: {e}", file=sys.stderr)
            sys.exit(2)
    app.run(main)


if __name__ == "__main__":
    entry()
