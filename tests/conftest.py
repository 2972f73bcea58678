"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

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
