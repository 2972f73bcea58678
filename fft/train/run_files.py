"""The files of a workdir that the Trainer owns: config.json, model.json, tokenizer/,
results.json (with the history of earlier segments).

Methods never read or write these (tests/test_layering.py): a method that needs to know whether
the run is fresh reads `Context.fresh`, and extra results come back from `Recipe.finalize`.
"""

from __future__ import annotations

import json
import os

import jax


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
    os.makedirs(workdir, exist_ok=True)
    text = json.dumps(record, indent=2, default=str)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path) and os.path.isdir(os.path.join(workdir, "checkpoints")):
        # A restart with other settings resumes all the same (changing e.g. mixture weights or
        # steps on resume is legitimate); say what changed so an accidental change is seen.
        try:
            with open(path) as f:
                changed = changed_settings(json.load(f), json.loads(text))
        except ValueError:  # an unreadable old config.json only loses the comparison
            changed = []
        if changed:
            print("Resuming with changed settings: " + "; ".join(changed[:10]), flush=True)
    with open(path, "w") as f:
        f.write(text)
    if model_config is not None:
        with open(os.path.join(workdir, "model.json"), "w") as f:
            json.dump(model_config.to_dict(), f, indent=2)
    tok_dir = os.path.join(workdir, "tokenizer")
    if tokenizer is not None and not os.path.isdir(tok_dir):
        os.makedirs(tok_dir, exist_ok=True)
        tokenizer.save(tok_dir)


def previous_results(workdir: str) -> dict | None:
    """The results.json of a run this one resumes (it had finished at fewer steps), or None."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # a torn file keeps no record worth keeping
        return None


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
    """Writes `workdir/name` (primary process only, atomically); returns its path."""
    path = os.path.join(workdir, name)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2, default=str)
        os.replace(tmp, path)
    return path


def read_json(workdir, name: str) -> dict | None:
    """`workdir/name` parsed, or None when it is missing or torn."""
    try:
        with open(os.path.join(workdir, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
