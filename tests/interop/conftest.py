"""Shared helpers for the HF / PEFT parity tests: tiny random HF models saved to tmp dirs."""

import numpy as np
import pytest

import fft  # noqa: F401  (flax settings before any model is built)


@pytest.fixture(scope="session")
def torch_mod():
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def transformers_mod():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def left_padded_batch(vocab: int, t: int = 12, pad: int = 4, seed: int = 0):
    """tokens [2,T], mask [2,T] (row 0 left-padded by `pad`), positions from the mask."""
    tok = np.random.RandomState(seed).randint(3, vocab, (2, t)).astype(np.int32)
    mask = np.ones_like(tok)
    mask[0, :pad] = 0
    tok[0, :pad] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int32)
    return tok, mask, pos


def perturb_norms_and_biases(model, torch_mod, scale=0.1):
    """HF inits norms to 1 and biases to 0; move them so a swapped mapping cannot pass."""
    with torch_mod.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("ln_") or name.endswith("bias"):
                p.add_(torch_mod.randn_like(p) * scale)
