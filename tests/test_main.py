"""The command line: config errors are one clear message; the smoke run trains and resumes."""

import json
import os
import subprocess
import sys

import pytest

from fft import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env_extra=None, timeout=600):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "fft.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_unknown_override_key_is_named(tmp_path):
    r = run_cli(
        "--config=configs/pretrain.py:smoke", f"--workdir={tmp_path}", "--config.optim.lrr=1"
    )
    assert r.returncode != 0
    assert "config.optim.lrr" in r.stderr and "config.optim.lr" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_config_file_is_named(tmp_path):
    r = run_cli("--config=configs/nope.py", f"--workdir={tmp_path}", "--config.steps=2")
    assert r.returncode != 0 and "configs/nope.py" in r.stderr


def test_load_config_overrides_and_errors():
    path = os.path.join(REPO, "configs", "rlhf.py")
    c = config_lib.load_config(path, "smoke", **{"rlhf.kl_coef": 0.3, "steps": 7})
    assert c.rlhf.kl_coef == 0.3 and c.steps == 7 and c.init_from == "fft:micro"
    # Strings from a command line take the field's type.
    config_lib.set_values(c, {"optim.lr": "3e-4", "rlhf.whiten": "false"}, cast=True)
    assert c.optim.lr == 3e-4 and c.rlhf.whiten is False
    with pytest.raises(config_lib.ConfigError, match="config.rlhf.kl_coef"):
        config_lib.load_config(path, **{"rlhf.kl_coeff": 0.1})
    with pytest.raises(config_lib.ConfigError, match="nope.py not found"):
        config_lib.load_config(os.path.join(REPO, "configs", "nope.py"))
    # Experiment scripts' "a.b=1,c=x" overrides.
    over = config_lib.parse_overrides("optim.lr=1e-3, rlhf.tasks=count")
    assert over == {"optim.lr": "1e-3", "rlhf.tasks": "count"}
    c = config_lib.load_config(path, "smoke", cast=True, **over)
    assert c.optim.lr == 1e-3 and c.rlhf.tasks == "count"
    with pytest.raises(config_lib.ConfigError, match="'steps' is not KEY=VALUE"):
        config_lib.parse_overrides("steps")


def test_run_once_reads_a_finished_run(tmp_path):
    """A workdir with results.json is not run again (experiment scripts rely on it)."""
    from fft import main as fft_main

    (tmp_path / "results.json").write_text('{"method": "pretrain", "done": 1}')
    assert fft_main.run_once(config_lib.pretrain_config("micro"), str(tmp_path))["done"] == 1


def test_validation_names_the_key():
    c = config_lib.pretrain_config("micro")
    c.optim.grad_accum = 3
    with pytest.raises(config_lib.ConfigError, match="grad_accum"):
        config_lib.validate(c)
    c = config_lib.pretrain_config("micro")
    c.model.dtype = "float16"
    with pytest.raises(config_lib.ConfigError, match="model.dtype"):
        config_lib.validate(c)


def test_mesh_that_does_not_divide_devices(tmp_path):
    r = run_cli(
        "--config=configs/pretrain.py:smoke",
        f"--workdir={tmp_path}",
        "--config.mesh.data=3",
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "mesh" in r.stderr and "Traceback" not in r.stderr


def test_pretrain_smoke_trains_and_resumes(tmp_path):
    workdir = tmp_path / "w"
    r = run_cli("--config=configs/pretrain.py:smoke", f"--workdir={workdir}")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["method"] == "pretrain"
    assert results["after"]["loss"] < results["before"]["loss"]
    assert (workdir / "metrics.jsonl").exists()
    assert any(p.name.startswith("events") for p in (workdir / "tb").rglob("*"))
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any(line.get("split") == "train" and "loss" in line for line in lines)
    # A second run with more steps resumes from the last checkpoint instead of starting over.
    r = run_cli("--config=configs/pretrain.py:smoke", f"--workdir={workdir}", "--config.steps=34")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resum" in (r.stdout + r.stderr)
    assert json.loads((workdir / "results.json").read_text())["steps"] == 34


def test_export_hf_matches_transformers(tmp_path):
    """An fft run exported with `python -m fft.export` gives the same logits in transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import numpy as np

    import fft

    workdir, out = tmp_path / "w", tmp_path / "hf"
    r = run_cli("--config=configs/pretrain.py:smoke", f"--workdir={workdir}", "--config.steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(
        [sys.executable, "-m", "fft.export", f"--workdir={workdir}", f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    model, tokenizer = fft.load(str(workdir))
    tokens = np.asarray([tokenizer.encode("The cat sat on the mat.")], np.int32)
    ours = np.asarray(model(tokens))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # A run without LoRA has no adapter to export: one clear message.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fft.export",
            f"--workdir={workdir}",
            f"--out={tmp_path}/p",
            "--format=peft",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "not a LoRA run" in r.stderr
