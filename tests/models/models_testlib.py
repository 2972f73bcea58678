"""Shared helpers of the model tests: micro configs per family and jitted calls.

Model calls go through `nnx.jit`: eager op-by-op dispatch compiles every op separately and is
many times slower on the shared 2-core test machine than one compiled forward.
"""

import jax
import jax.numpy as jnp
from flax import nnx

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
    "qwen3": MICRO.replace(family="qwen3", qk_norm=True, norm_eps=1e-6),
    # Layer 0 local (its own rope base), layer 1 global; QK-norm with gemma's (1 + w).
    "gemma3": MICRO.replace(
        family="gemma3_text", norm_offset=1.0, mlp="geglu", act="gelu_tanh", embed_scale=True,
        post_norms=True, qk_norm=True, sliding_window=4, sliding_window_pattern=2,
        rope_theta=1e6, rope_local_theta=1e4, query_scale=0.2, tie_embeddings=True,
    ),
}  # fmt: skip


@nnx.jit
def forward(model, tokens, positions=None, segment_ids=None):
    return model(tokens, positions, segment_ids)


@nnx.jit
def hidden(model, tokens):
    return model.hidden_states(tokens)


@nnx.jit
def decode(model, tokens, positions, cache):
    return model.decode(tokens, positions, cache)


def tokens(cfg, b=2, t=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 3, cfg.vocab_size, jnp.int32)
