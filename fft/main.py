"""Entry point: `python -m fft.main --config=configs/<method>.py[:variant] --workdir=DIR`.

Parses the ml_collections config (with `--config.x.y=value` overrides), validates it before
anything compiles, resolves `init_from` presets (`fft:tiny` is built and cached on first use),
then hands the config to `fft.methods.<config.method>.run`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fft import config_lib, distributed

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


def run(config, workdir: str) -> dict:
    """Validates `config`, resolves `init_from`, runs the method; returns its results dict."""
    config_lib.validate(config)
    from fft import zoo  # deferred: imports jax

    with config.unlocked():
        config.init_from = zoo.resolve(config.init_from)
    method = importlib.import_module(f"fft.methods.{config.method}")
    return method.run(config, os.path.abspath(workdir))


def run_once(config, workdir: str) -> dict:
    """`run`, unless `workdir` already holds a finished run; then its `results.json`.

    Experiment scripts chain many runs: with this a rerun after a crash or a kill redoes only
    the runs that had not finished (an unfinished one resumes from its checkpoint).
    """
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return run(config, workdir)
    with open(path) as f:
        return json.load(f)


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


def entry() -> None:
    """Console-script entry: checks override keys before absl parses them."""
    argv = sys.argv
    config_arg = next((a for a in argv if a.startswith("--config=")), None)
    keys = _overrides(argv)
    if config_arg and keys:
        # ml_collections reports an unknown override as a KeyError deep in flag parsing; name
        # the key and the closest real one instead.
        try:
            module_path, _, variant = config_arg.split("=", 1)[1].partition(":")
            config_lib.check_overrides(config_lib.load_config(module_path, variant), keys)
        except config_lib.FFTError as e:
            print(f"fft: error: {e}", file=sys.stderr)
            sys.exit(2)
    app.run(main)


if __name__ == "__main__":
    entry()
