"""Response perplexity: only loss-mask targets count, and empty padding rows add nothing."""

import math

import numpy as np
import pytest
from flax import nnx

from fft.data.batch import empty_row, single_row, stack_rows
from fft.eval import perplexity
from fft.models import presets
from fft.models.transformer import Transformer


def test_perplexity_counts_targets_only_and_ignores_padding_rows():
    model = Transformer(presets.get_preset("micro"), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 500, 12).tolist()
    mask = [0] * 8 + [1] * 4  # the response: the last four tokens
    one = stack_rows([single_row(tokens, mask, 16)])
    padded = stack_rows([single_row(tokens, mask, 16), empty_row(16)])
    a = perplexity.evaluate(model, [one])
    b = perplexity.evaluate(model, [padded], prefix="response_")
    assert a["loss"] == pytest.approx(b["response_loss"], rel=1e-6)
    assert a["ppl"] == pytest.approx(math.exp(a["loss"]), rel=1e-6)
    # The mask picks the targets: counting the prompt too gives a different mean.
    whole = stack_rows([single_row(tokens, [0] + [1] * 11, 16)])
    assert perplexity.evaluate(model, [whole])["loss"] != pytest.approx(a["loss"])
