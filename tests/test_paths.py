"""fft.paths: URLs (gs://) stay URLs all the way to orbax, the metrics and the data readers;
local paths become absolute. Remote I/O is faked with `etils.epath.testing.mock_epath`, which
maps every `gs://` path onto a local directory."""

import contextlib
import json
import os

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from fft import checkpoint, metrics, paths
from fft import main as fft_main
from fft.data import sources


def test_workdir_path_keeps_urls_and_absolutizes_local(tmp_path, monkeypatch):
    url = paths.workdir_path("gs://bucket/run")
    assert isinstance(url, epath.Path) and str(url) == "gs://bucket/run"
    assert str(url / "checkpoints") == "gs://bucket/run/checkpoints"
    assert paths.workdir_str("gs://bucket/run") == "gs://bucket/run"
    assert paths.workdir_path(url) is url
    monkeypatch.chdir(tmp_path)
    local = paths.workdir_path("runs/a")
    assert str(local) == os.path.join(str(tmp_path), "runs", "a") and local.is_absolute()
    assert paths.is_url("s3://b/x") and not paths.is_url("/tmp/x")
    # What os.path.abspath would have done: the bug this module exists for.
    assert os.path.abspath("gs://bucket/run") != "gs://bucket/run"


@contextlib.contextmanager
def _fake_gcs(root):
    """Every gs://BUCKET/KEY lives at ROOT/BUCKET/KEY; records which URLs were touched."""
    touched = []

    def local(path):
        text = os.fspath(path)
        assert text.startswith("gs://"), text
        touched.append(text)
        return os.path.join(str(root), text[len("gs://") :])

    def one(fn_name):
        return lambda original, path, *a, **k: original(local(path), *a, **k)

    def glob(original, pattern):
        return ["gs://" + os.path.relpath(p, root) for p in original(local(pattern))]

    def listdir(original, path):
        return original(local(path))

    fns = {n: one(n) for n in ("open", "exists", "isdir", "makedirs", "mkdir", "remove", "stat")}
    fns.update(
        rename=lambda original, path, dst: original(local(path), local(dst)),
        replace=lambda original, path, dst: original(local(path), local(dst)),
        glob=glob,
        listdir=listdir,
    )
    with epath_testing.mock_epath(**fns):
        yield touched


def test_json_helpers_and_metrics_on_a_url(tmp_path):
    with _fake_gcs(tmp_path) as touched:
        paths.write_json("gs://bucket/run/config.json", {"a": 1})
        assert paths.read_json("gs://bucket/run/config.json") == {"a": 1}
        assert paths.read_json("gs://bucket/run/missing.json", default={}) == {}
        writer = metrics.MetricWriter("gs://bucket/run", tensorboard=False)
        writer.write(1, {"loss": 2.0})
        writer.write(2, {"loss": 1.5})
        writer.close()
        # A resumed run's writer keeps the earlier lines (an object store cannot append).
        again = metrics.MetricWriter("gs://bucket/run", tensorboard=False)
        again.write(3, {"loss": 1.0})
        again.close()
    assert all(t.startswith("gs://bucket/run") for t in touched)
    with open(tmp_path / "bucket" / "run" / "config.json") as f:
        assert json.load(f) == {"a": 1}
    with open(tmp_path / "bucket" / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] == 1.5
    assert not (tmp_path / "gs:").exists()


def test_data_files_on_a_url(tmp_path):
    os.makedirs(tmp_path / "bucket" / "data")
    for name, n in (("a.jsonl", 3), ("b.jsonl", 2)):
        with open(tmp_path / "bucket" / "data" / name, "w") as f:
            f.writelines(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(n))
    with _fake_gcs(tmp_path):
        src = sources.open_source("gs://bucket/data/*.jsonl")
        assert len(src) == 5 and src[3] == {"text": "b.jsonl 0"}
        assert src.origin(0) == "gs://bucket/data/a.jsonl:1"
        assert len(sources.open_source("gs://bucket/data")) == 5
        with pytest.raises(Exception, match="not found"):
            sources.open_source("gs://bucket/data/nope.jsonl")


def test_orbax_gets_the_url_unchanged(monkeypatch):
    seen = {}

    class FakeManager:
        def __init__(self, directory, options=None):
            seen["directory"] = directory

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", FakeManager)
    c = checkpoint.Checkpointer("gs://bucket/run/checkpoints")
    assert isinstance(seen["directory"], epath.Path)
    assert str(seen["directory"]) == "gs://bucket/run/checkpoints"
    assert str(c.directory) == "gs://bucket/run/checkpoints"


def test_check_workdir_keeps_urls(tmp_path):
    assert fft_main.check_workdir("gs://bucket/run") == "gs://bucket/run"
    assert fft_main.check_workdir(str(tmp_path / "x")) == str(tmp_path / "x")
