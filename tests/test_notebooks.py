"""Executes every colab/*.ipynb top to bottom on smoke settings (FFT_NOTEBOOK_SMOKE=1).

Notebooks read the variable and pick their `smoke` config (micro base, a few steps); they write
under FFT_NOTEBOOK_WORKDIR, which each run points at a fresh temporary directory. A notebook is
picked up by being in colab/; nothing here names one.
"""

import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs_on_smoke_settings(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel inherits this process's environment (conftest's 8 fake CPU devices included).
    monkeypatch.setenv("FFT_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("FFT_NOTEBOOK_WORKDIR", str(tmp_path / "workdir"))
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{os.path.basename(path)} failed:\n{str(e)[-3000:]}")
