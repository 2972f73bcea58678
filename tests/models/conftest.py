"""Micro configs of each decoder family, shared by the model tests."""

import pytest

import fft  # noqa: F401  (sets flax_always_shard_variable before any model is built)
from fft.models.presets import get_preset

MICRO = get_preset("micro")

FAMILIES = {
    "llama": MICRO,
    "gpt2": MICRO.replace(
        family="gpt2", norm="layer", norm_eps=1e-5, pos="learned", mlp="gelu", act="gelu_tanh",
        qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True, n_kv_heads=4,
    ),
    "gemma2": MICRO.replace(
        family="gemma2", norm_offset=1.0, mlp="geglu", act="gelu_tanh", embed_scale=True,
        logit_softcap=30.0, attn_softcap=50.0, post_norms=True, sliding_window=4,
        sliding_window_pattern=2, query_scale=0.2, tie_embeddings=True, n_kv_heads=1,
    ),
}  # fmt: skip


@pytest.fixture(params=sorted(FAMILIES))
def family_cfg(request):
    return FAMILIES[request.param]
