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
from fft.models import lora as lora_lib
from fft.models import presets
from fft.models.config import VOCAB_MULTIPLE, ModelConfig
from fft.models.transformer import Transformer
from fft.tokenizers import Tokenizer
from fft.train import losses
from fft.train.state import trainable_filter_from_config


@dataclasses.dataclass
class Base:
    """A model to start from: its architecture, tokenizer and (optionally) weights."""

    model_config: ModelConfig
    tokenizer: Tokenizer
    # (abstract_state, shardings) -> State of the leaves it knows; None = random init only.
    load_weights: Callable | None = None


def _runtime_options(model_config: ModelConfig, config) -> ModelConfig:
    """Applies the run's compute options (dtype, remat, scan, attention) to a model config."""
    m = config.model
    return model_config.replace(
        dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, attention=m.attention
    )


def load_base(config) -> Base:
    """The base named by `config.init_from` (a local path after fft.zoo resolved presets)."""
    spec = pretrained.load_spec(config.init_from)
    model_config = spec.model_config
    if spec.kind == "fft" and isinstance(model_config, ModelConfig):
        # An fft model built before vocabularies were padded (or with another multiple) gets
        # its padding here; `load_weights` fills the new rows (pretrained.place). HF models
        # keep their own rows, so their logits stay exactly transformers'.
        model_config = _padded(model_config)
    return Base(_runtime_options(model_config, config), spec.tokenizer, spec.load_weights)


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
    return Base(_runtime_options(model_config, config), tokenizer, None)


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
