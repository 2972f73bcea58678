"""The files of a workdir that the Trainer owns: config.json, model.json, tokenizer/,
results.json (with the history of earlier segments).

Methods never read or write these (tests/test_layering.py): a method that needs to know whether
the run is fresh reads `Context.fresh`, and extra results come back from `Recipe.finalize`.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
from etils import epath

from fft import paths


def changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# ModelConfig fields that are runtime options or sizes fitted to the data, not the architecture
# a preset names: a loaded fft:tiny with its own vocabulary or bf16 compute is still 'tiny'.
_NOT_ARCHITECTURE = (
    "vocab_size", "real_vocab_size", "max_seq_len", "dtype", "param_dtype", "remat",
    "scan_layers", "attention", "quant", "quant_block",
)  # fmt: skip


def _preset_of(model_config) -> str | None:
    """The name of the fft.models preset whose architecture `model_config` has, else None."""
    from fft.models import presets

    def arch(mc):
        return {k: v for k, v in mc.to_dict().items() if k not in _NOT_ARCHITECTURE}

    try:
        mine = arch(model_config)
    except AttributeError:  # not a ModelConfig: nothing to name
        return None
    return next((n for n, p in presets.PRESETS.items() if arch(p) == mine), None)


def recorded_config(config, model_config) -> dict:
    """The config as config.json records it: what was actually built, not a stale default.

    `model.preset` only chooses the architecture of a model trained from scratch; with
    `init_from` the architecture is the loaded model's, so the record names the preset that
    architecture matches (None for other models, e.g. a HF one) and `model.built` holds the
    model config actually used (model.json has the same).
    """
    to_json = getattr(config, "to_json_best_effort", None)
    record = json.loads(to_json() if to_json else json.dumps(dict(config), default=str))
    model = record.get("model")
    if model_config is not None and isinstance(model, dict):
        if record.get("init_from"):
            model["preset"] = _preset_of(model_config)
        if hasattr(model_config, "to_dict"):
            model["built"] = model_config.to_dict()
    return record


def write_run_files(record: dict, workdir, tokenizer, model_config) -> None:
    """Writes config.json (`record`), model.json and tokenizer/ (primary process only)."""
    if jax.process_index() != 0:
        return
    root = paths.workdir_path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    if (root / "config.json").exists() and (root / "checkpoints").is_dir():
        # A restart with other settings resumes all the same (changing e.g. mixture weights or
        # steps on resume is legitimate); say what changed so an accidental change is seen.
        try:
            changed = changed_settings(paths.read_json(root / "config.json"), record)
        except ValueError:  # an unreadable old config.json only loses the comparison
            changed = []
        if changed:
            print("Resuming with changed settings: " + "; ".join(changed[:10]), flush=True)
    paths.write_json(root / "config.json", record)
    if model_config is not None:
        paths.write_json(root / "model.json", model_config.to_dict())
    if tokenizer is not None and not (root / "tokenizer").is_dir():
        if paths.is_url(root):  # tokenizers write local files: stage, then copy up
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer.save(tmp)
                (root / "tokenizer").mkdir(parents=True, exist_ok=True)
                for name in os.listdir(tmp):
                    epath.Path(tmp, name).copy(root / "tokenizer" / name)
        else:
            os.makedirs(root / "tokenizer", exist_ok=True)
            tokenizer.save(str(root / "tokenizer"))


def previous_results(workdir) -> dict | None:
    """The results.json of a run this one resumes (it had finished at fewer steps), or None."""
    return read_json(workdir, "results.json")


def keep_history(results: dict, previous: dict) -> None:
    """Continuing a finished run: the new record keeps the earlier one.

    `history` lists the earlier records (oldest first, each as it was written), `steps_covered`
    is the step range of this record ([0, steps]: training is cumulative) and `wall_s` sums the
    segments (as `cost.tokens` does).
    """
    earlier = {k: v for k, v in previous.items() if k != "history"}
    results["history"] = list(previous.get("history") or []) + [earlier]
    results["steps_covered"] = [0, results["steps"]]
    results["wall_s"] = results["wall_s"] + float(previous.get("wall_s") or 0.0)


def write_json(workdir, name: str, value: dict) -> str:
    """Writes `workdir/name` (primary process only, atomically where local); returns its path."""
    path = paths.workdir_path(workdir) / name
    if jax.process_index() == 0:
        paths.write_json(path, value)
    return str(path)


def read_json(workdir, name: str) -> dict | None:
    """`workdir/name` parsed, or None when it is missing or torn."""
    try:
        return paths.read_json(paths.workdir_path(workdir) / name)
    except (OSError, ValueError):
        return None
