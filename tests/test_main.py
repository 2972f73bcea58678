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
    # `run` is the same: a run finished at >= config.steps is returned untouched ...
    record = {"method": "pretrain", "steps": 40, "config": {"steps": 40}, "done": 2}
    (tmp_path / "results.json").write_text(json.dumps(record))
    assert fft_main.run(config_lib.pretrain_config("micro"), str(tmp_path))["done"] == 2
    # ... and one finished at fewer steps is not finished for a config that asks for more.
    c = config_lib.pretrain_config("micro")
    c.steps = 41
    assert fft_main.finished_results(c, str(tmp_path)) is None


def test_config_json_records_the_model_built(tmp_path):
    """Issue 17 #16: a run from init_from records the loaded model, not the scratch default."""
    from fft.models import presets
    from fft.train.run_files import recorded_config, write_run_files

    def _write_run_files(c, w, tok, mc):
        write_run_files(recorded_config(c, mc), w, tok, mc)

    c = config_lib.load_config(os.path.join(REPO, "configs", "domain.py"))
    assert c.model.preset == "micro"  # the scratch default, unused with init_from
    c.init_from = str(tmp_path / "tiny-v3")  # what fft.zoo resolves fft:tiny to
    built = presets.get_preset("tiny").replace(vocab_size=4000)
    _write_run_files(c, str(tmp_path / "w"), None, built)
    record = json.loads((tmp_path / "w" / "config.json").read_text())
    assert record["model"]["preset"] == "tiny"
    assert record["model"]["built"]["d_model"] == built.d_model == 256
    assert record["model"]["built"]["vocab_size"] == 4000
    # From scratch the preset is what was built: kept.
    c = config_lib.pretrain_config("micro")
    _write_run_files(c, str(tmp_path / "s"), None, presets.get_preset("micro"))
    assert json.loads((tmp_path / "s" / "config.json").read_text())["model"]["preset"] == "micro"


def test_validation_names_the_key():
    c = config_lib.pretrain_config("micro")
    c.optim.grad_accum = 3
    with pytest.raises(config_lib.ConfigError, match="grad_accum"):
        config_lib.validate(c)
    c = config_lib.pretrain_config("micro")
    c.model.dtype = "float16"
    with pytest.raises(config_lib.ConfigError, match="model.dtype"):
        config_lib.validate(c)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("fft: error:")]


def test_mesh_that_does_not_divide_devices(tmp_path):
    """Issue 17 #8: one `fft: error:` line naming mesh.data, the device count and a fix."""
    r = run_cli(
        "--config=configs/pretrain.py:smoke",
        f"--workdir={tmp_path}",
        "--config.mesh.data=3",
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = _error_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-2000:]
    assert "config.mesh.data=3" in lines[0] and "8 devices" in lines[0]
    assert "--config.mesh.data=8" in lines[0]  # a value that works
    assert not os.listdir(tmp_path)  # failed before anything was written


def test_newcomer_mistakes_are_one_line(tmp_path):
    """Issue 17 #15: a misspelt config file, an unknown variant, a workdir that is a file."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    cases = [
        (["--config=configs/domian.py", f"--workdir={tmp_path}/w"], ["configs/domain.py"]),
        (
            ["--config=configs/domain.py:lroa", f"--workdir={tmp_path}/w"],
            ["'lroa'", "configs/domain.py:lora", "'vocab'", "'smoke'"],
        ),
        (
            ["--config=configs/pretrain.py:smoke", f"--workdir={a_file}"],
            [f"--workdir={a_file}", "not a directory"],
        ),
    ]
    for args, wanted in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        lines = _error_lines(r.stderr)
        assert len(lines) == 1, (args, r.stderr[-2000:])
        for text in wanted:
            assert text in lines[0], (args, lines[0])
    assert a_file.read_text() == "not a directory"


def _snapshot(workdir) -> dict:
    """{relative path: (bytes, mtime_ns)} of every file under `workdir`."""
    return {
        str(p.relative_to(workdir)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(workdir.rglob("*"))
        if p.is_file()
    }


def test_pretrain_smoke_trains_and_resumes(tmp_path):
    """Trains; a rerun of the finished run changes nothing (issue 17 #14); more steps continue
    it and the new results.json keeps the earlier record."""
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
    # The same command again: says so, prints the table from the file, changes nothing.
    before = _snapshot(workdir)
    r = run_cli("--config=configs/pretrain.py:smoke", f"--workdir={workdir}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"run already finished at step 30: results in {workdir}/results.json" in r.stdout
    assert "ppl" in r.stdout  # the table
    assert _snapshot(workdir) == before
    # A second run with more steps resumes from the last checkpoint instead of starting over,
    # and keeps the finished run's record.
    r = run_cli("--config=configs/pretrain.py:smoke", f"--workdir={workdir}", "--config.steps=34")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resum" in (r.stdout + r.stderr)
    new = json.loads((workdir / "results.json").read_text())
    assert new["steps"] == 34 and new["steps_covered"] == [0, 34]
    assert new["history"] == [results]
    assert new["before"] == results["before"] and new["train_loss"] is not None
    assert new["wall_s"] > results["wall_s"]


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
