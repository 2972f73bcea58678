"""Every config file runs from a fresh checkout (issue 17 #13) and names its variants (#15).

Resolution only: no model is built here (fft:tiny and fft:tiny-sft take minutes); the build of
an SFT preset is checked with the training itself replaced by a stub.
"""

import glob
import json
import os

import pytest

from fft import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(path, variant=""):
    return config_lib.load_config(path, variant)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_default_init_from_resolves_from_an_empty_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh checkout: no runs/ of earlier configs
    config = _load(path)
    config_lib.validate(config)
    source = config.init_from
    # A known fft: preset, a pip package (checked when loaded, with its install command), or an
    # existing path; never a folder only an earlier run would have made.
    config_lib.check_init_from(source)
    if source.startswith("fft:"):
        assert source[len("fft:") :] in config_lib.known_models()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_variant_loads_and_unknown_ones_are_listed(path):
    module_variants = _variants(path)
    assert "" in module_variants
    for variant in module_variants:
        config = _load(path, variant)
        config_lib.validate(config)
        config_lib.check_init_from(config.init_from)
    with pytest.raises(config_lib.ConfigError, match="unknown variant 'nope'") as e:
        _load(path, "nope")
    assert all(repr(v) in str(e.value) for v in module_variants if v)


def _variants(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_cfg_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VARIANTS


def test_chaining_your_own_run_is_still_documented():
    for name in ("reward", "rlhf", "dpo"):
        text = open(os.path.join(REPO, "configs", f"{name}.py")).read()
        assert "--config.init_from=runs/instruction" in text, name
        assert _load(os.path.join(REPO, "configs", f"{name}.py")).init_from == "fft:tiny-sft"


def test_unknown_preset_and_missing_path_are_named(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="fft:tiny-sft"):
        config_lib.check_init_from("fft:tiny_sft")
    with pytest.raises(config_lib.ConfigError, match="runs/instruction.*no such file"):
        config_lib.check_init_from("runs/instruction")
    config_lib.check_init_from(str(tmp_path))
    config_lib.check_init_from("")


def test_sft_preset_is_built_once_into_the_cache(tmp_path, monkeypatch):
    """fft:micro-sft: its base is resolved first, the instruction recipe trains into a temp dir
    that is renamed into place, and a second use reads the cache."""
    from fft import zoo
    from fft.methods import instruction
    from fft.train import trainer

    monkeypatch.setenv("FFT_CACHE", str(tmp_path))
    base = tmp_path / f"micro-{zoo.RECIPE_VERSION}"
    base.mkdir()
    (base / "results.json").write_text("{}")  # a cached fft:micro: not rebuilt here
    calls = []

    def fake_run(config, workdir):
        calls.append((config.method, config.init_from, workdir))
        assert not os.path.exists(tmp_path / f"micro-sft-{zoo.RECIPE_VERSION}")  # not yet
        os.makedirs(workdir)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({"method": "instruction", "steps": config.steps}, f)
        return {"method": "instruction", "steps": config.steps}

    # zoo runs `trainer.fit(config, workdir, instruction.recipe(config, workdir))`.
    monkeypatch.setattr(instruction, "recipe", lambda config, workdir=None: None)
    monkeypatch.setattr(trainer, "fit", lambda config, workdir, recipe: fake_run(config, workdir))
    path = zoo.resolve("fft:micro-sft")
    assert path == str(tmp_path / f"micro-sft-{zoo.RECIPE_VERSION}")
    assert calls == [("instruction", str(base), calls[0][2])]
    assert ".building-" in calls[0][2]  # trained elsewhere, renamed when complete
    assert os.path.exists(os.path.join(path, "results.json"))
    assert not glob.glob(str(tmp_path / "*.building-*"))
    assert zoo.resolve("fft:micro-sft") == path and len(calls) == 1  # cached
    # The recipe is the instruction method's on the base model.
    recipe = config_lib.sft_config("tiny-sft")
    assert recipe.method == "instruction" and recipe.init_from == "fft:tiny"
    assert recipe.steps == _load(os.path.join(REPO, "configs", "instruction.py")).steps
