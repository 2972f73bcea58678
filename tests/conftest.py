"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never build the full fft:tiny model unless marked slow; keep caches out of $HOME.
os.environ.setdefault("FFT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "fft"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: builds large artefacts (fft:tiny); deselect with -m 'not slow'"
    )


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    """A headless chromium (playwright) for the pages of fft.label and fft.report."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()
