"""fft.models: Flax NNX modules (decoders, heads, LoRA) and their configs."""

from fft.models.config import ModelConfig
from fft.models.heads import ClassificationHead, ScalarHead, SequenceClassifier, ValueHead
from fft.models.lora import LoRAParam, apply_lora, disable_lora, lora_filter, merge_lora
from fft.models.presets import PRESETS, get_preset
from fft.models.transformer import KVCache, Transformer, count_params

__all__ = [
    "PRESETS",
    "ClassificationHead",
    "KVCache",
    "LoRAParam",
    "ModelConfig",
    "ScalarHead",
    "SequenceClassifier",
    "Transformer",
    "ValueHead",
    "apply_lora",
    "count_params",
    "disable_lora",
    "get_preset",
    "lora_filter",
    "merge_lora",
]
