"""Pieces every language-model method shares: the base model, the builder, the LM loss.

Methods differ by data recipe, loss and evals; what they share about the decoder itself (where
its weights come from, LoRA, which params train, the next-token loss) lives here once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

from fft import pretrained
from fft.data import formats
from fft.models import attention, presets
from fft.models import lora as lora_lib
from fft.models.config import VOCAB_MULTIPLE, ModelConfig
from fft.models.transformer import Transformer
from fft.tokenizers import Tokenizer
from fft.train import losses
from fft.train.recipe import ModelSpec
from fft.train.state import trainable_filter_from_config


@dataclasses.dataclass
class Base:
    """A model to start from: its architecture, tokenizer and (optionally) weights."""

    model_config: ModelConfig
    tokenizer: Tokenizer
    # (abstract_state, shardings) -> State of the leaves it knows; None = random init only.
    load_weights: Callable | None = None


# Where `auto` asks for bf16: accelerators with bf16 matmul units. CPUs compute bf16 slowly
# (converted to f32 per op) and the tests compare f32 numbers.
_BF16_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")


def resolve_dtypes(config, platform: str | None = None) -> tuple[str, str]:
    """`(dtype, param_dtype)` of `config.model`, with `auto` resolved for `platform`.

    `dtype` auto: bfloat16 on TPU/GPU, float32 on CPU. `param_dtype` auto: bfloat16 for a
    frozen base (LoRA, `lora.rank > 0`) on TPU/GPU, else float32: full fine-tuning keeps f32
    master weights (a bf16 Adam update of a large weight loses the small steps), while a frozen
    base never changes, so bf16 only halves its memory. Adapters stay f32 either way
    (fft.models.lora), and so do their Adam moments and the loss (logits are cast to f32).

    Args:
      config: the run config (`model.dtype`, `model.param_dtype`, `lora.rank`).
      platform: 'cpu' | 'gpu' | 'tpu'; default `attention.platform()` (the active mesh's
        devices, else the default backend): `fft.compile` passes its topology's.
    """
    platform = platform or attention.platform()
    accel = platform in _BF16_PLATFORMS
    m = config.model
    dtype = m.dtype if m.dtype != "auto" else ("bfloat16" if accel else "float32")
    param_dtype = m.get("param_dtype", "float32")
    if param_dtype == "auto":
        frozen_base = config.lora.rank > 0
        param_dtype = "bfloat16" if accel and frozen_base else "float32"
    return dtype, param_dtype


def runtime_options(model_config: ModelConfig, config, platform: str | None = None) -> ModelConfig:
    """Applies the run's options (dtypes, quantization, remat, scan, attention) to a model
    config; `auto` dtypes resolve for `platform` (see `resolve_dtypes`)."""
    m = config.model
    dtype, param_dtype = resolve_dtypes(config, platform)
    return model_config.replace(
        dtype=dtype,
        param_dtype=param_dtype,
        quant=m.get("quant", "none"),
        quant_block=m.get("quant_block", 64),
        remat=m.remat,
        scan_layers=m.scan_layers,
        attention=m.attention,
    )


def frozen_model_config(model_config: ModelConfig, config) -> ModelConfig:
    """The config of a frozen copy of the start (a DPO / PPO reference): with
    `model.param_dtype='auto'` its weights are stored in the compute dtype (bf16 on TPU/GPU,
    halving its memory): it is never updated, so f32 master weights buy it nothing. On CPU the
    compute dtype is f32 and the copy is exact."""
    if config.model.get("param_dtype", "float32") == "auto":
        return model_config.replace(param_dtype=model_config.dtype)
    return model_config


def load_base(config) -> Base:
    """The base named by `config.init_from` (a local path after fft.zoo resolved presets)."""
    spec = pretrained.load_spec(config.init_from)
    model_config = spec.model_config
    if spec.kind == "fft" and isinstance(model_config, ModelConfig):
        # An fft model built before vocabularies were padded (or with another multiple) gets
        # its padding here; `load_weights` fills the new rows (pretrained.place). HF models
        # keep their own rows, so their logits stay exactly transformers'.
        model_config = _padded(model_config)
    return Base(runtime_options(model_config, config), spec.tokenizer, spec.load_weights)


def _padded(model_config: ModelConfig) -> ModelConfig:
    """`model_config` with its rows padded to a multiple of VOCAB_MULTIPLE (if not already)."""
    if model_config.vocab_size % VOCAB_MULTIPLE == 0:
        return model_config
    return model_config.with_vocab(model_config.n_tokens)


def scratch_base(config, tokenizer: Tokenizer) -> Base:
    """A randomly initialised `config.model.preset`, sized to `tokenizer`'s vocabulary.

    The embedding gets `tokenizer.vocab_size` real rows padded up to a multiple of
    VOCAB_MULTIPLE (masked in the logits, cut off on export): see `ModelConfig.with_vocab`.
    """
    model_config = presets.get_preset(config.model.preset).with_vocab(tokenizer.vocab_size)
    if config.seq_len > model_config.max_seq_len:
        model_config = model_config.replace(max_seq_len=config.seq_len)
    return Base(runtime_options(model_config, config), tokenizer, None)


def add_lora(model: nnx.Module, config, rngs: nnx.Rngs) -> nnx.Module:
    """Attaches LoRA adapters when `config.lora.rank > 0`."""
    if config.lora.rank > 0:
        targets = config.lora.targets
        targets = "all" if targets == "all" else tuple(t.strip() for t in targets.split(","))
        lora_lib.apply_lora(
            model,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            targets=targets,
            rngs=rngs,
            rslora=config.lora.rslora,
            dropout=config.lora.dropout,
        )
    return model


def model_builder(model_config: ModelConfig, config) -> Callable[[], nnx.Module]:
    """A zero-argument function building the (random-init) model, LoRA attached; jit-traceable."""

    def build() -> nnx.Module:
        rngs = nnx.Rngs(config.seed)
        return add_lora(Transformer(model_config, rngs=rngs), config, rngs)

    return build


def model_spec(base: Base, config) -> ModelSpec:
    """The ModelSpec of the trained decoder: `base`'s architecture and weights, LoRA attached."""
    return ModelSpec(model_builder(base.model_config, config), base.load_weights, base.model_config)


def trainable_filter(config):
    """The nnx filter of trainable params: LoRA params when rank > 0, else `config.trainable`."""
    return trainable_filter_from_config(config.trainable, config.lora.rank)


def next_token_loss_fn(chunk_size: int = 128):
    """LossFn for causal LM training: chunked cross-entropy over `batch['loss_mask']` targets.

    The chunked form never materialises [B,T,V] float32 logits (BENCHMARKS.md: +15% on CPU and
    the difference between fitting and not for large vocabularies).
    """

    def loss_fn(model, batch, rng):
        del rng
        hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        loss = losses.chunked_next_token_loss(hidden, model.logits, batch, chunk=chunk_size)
        n = losses.num_targets(batch)
        # loss_weight: a token mean, so grad accumulation weighs microbatches by their targets.
        return loss, {"target_tokens": n, "loss_weight": n}

    return loss_fn


def text_encoder(tokenizer: Tokenizer, seq_len: int, fmt: str = "text", **kwargs):
    """record -> example dict for `fmt`, for the data pipeline."""

    def encode(record: dict):
        return formats.encode_record(record, fmt, tokenizer, max_len=seq_len, **kwargs)

    return encode
