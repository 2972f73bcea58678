"""Named model sizes: `micro` for tests up to `7b` (Llama-2-7B) and `llama3-8b`."""

from __future__ import annotations

from fft.config_lib import ConfigError
from fft.models.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # Tests: builds and runs in milliseconds on a CPU.
    "micro": ModelConfig(
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=128,
        max_seq_len=512,
    ),  # fmt: skip
    # The base model `fft:tiny` pretrained on the synthetic general corpus.
    "tiny": ModelConfig(
        vocab_size=4096,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        head_dim=64,
        d_ff=768,
        max_seq_len=256,
    ),  # fmt: skip
    # The benchmark model of BENCHMARKS.md: 20,453,760 params.
    "20m": ModelConfig(
        vocab_size=8192,
        d_model=384,
        n_layers=8,
        n_heads=6,
        n_kv_heads=6,
        head_dim=64,
        d_ff=1024,
        rope_theta=10000.0,
        norm_eps=1e-6,
        tie_embeddings=False,
    ),  # fmt: skip
    # ~110M params, Llama shape.
    "100m": ModelConfig(
        vocab_size=16384,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        head_dim=64,
        d_ff=2048,
    ),  # fmt: skip
    # Llama-3.2-1B shape (1.24B params).
    "1b": ModelConfig(
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        max_seq_len=8192,
        norm_eps=1e-5,
        rope_theta=500000.0,
        tie_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),  # fmt: skip
    # Llama-2-7B.
    "7b": ModelConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        d_ff=11008,
        max_seq_len=4096,
        norm_eps=1e-5,
    ),  # fmt: skip
    # Llama-3-8B (8.03B params): GQA 32/8, 128k vocabulary, untied head; the AOT proofs of
    # docs/scaling.md compile it for TPU slices.
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        max_seq_len=8192,
        norm_eps=1e-5,
        rope_theta=500000.0,
    ),  # fmt: skip
}


def get_preset(name: str) -> ModelConfig:
    """Returns the ModelConfig of a named preset (a leading 'fft:' is accepted)."""
    key = name.removeprefix("fft:")
    if key not in PRESETS:
        raise ConfigError(f"Unknown model preset {name!r}; known presets: {sorted(PRESETS)}.")
    return PRESETS[key]
