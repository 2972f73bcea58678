"""Config helpers shared by every method: the base config, presets, validation.

Every method config starts from `base_config()` and adds its own keys below the shared ones.
No jax import here: configs and `fft.main` flag parsing must stay cheap.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any

import ml_collections


class FFTError(Exception):
    """An error meant for the user: one message naming the bad thing and the fix."""


class ConfigError(FFTError):
    """A config key that does not exist, has the wrong type, or does not fit the machine."""


METHODS = ("pretrain", "instruction", "domain", "transfer", "continual", "reward", "rlhf", "dpo")


def base_config() -> ml_collections.ConfigDict:
    """The keys every method shares (DESIGN.md, "Config keys every method shares")."""
    c = ml_collections.ConfigDict()
    c.method = ""  # which fft.methods.<name> runs this config
    c.init_from = "fft:tiny"  # 'fft:<preset>' | local HF dir | fft workdir | '' (scratch)
    c.seed = 0  # seeds params, data order and sampling
    c.steps = 100  # optimizer steps to train
    c.batch_size = 8  # global batch (rows) per optimizer step, split over data x fsdp
    c.seq_len = 256  # tokens per row after packing

    # Model: only used when init_from is '' (scratch) or to override a loaded model's options.
    c.model = ml_collections.ConfigDict()
    c.model.preset = "micro"  # fft.models.presets name used when training from scratch
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 | auto (bf16 on TPU/GPU)
    # Storage dtype of the base weights: float32 | bfloat16 | auto (bf16 for a frozen, i.e. LoRA,
    # base on TPU/GPU, else f32). LoRA adapters, their optimizer state and the loss stay f32.
    c.model.param_dtype = "float32"
    c.model.quant = "none"  # none | int8 | nf4: frozen base kernels quantized at load (QLoRA)
    c.model.quant_block = 64  # weights per quantization scale (fft.models.quant)
    c.model.remat = "none"  # rematerialisation: none | full | dots | save_qkv | offload
    c.model.scan_layers = False  # lax.scan over stacked layers (faster compile for deep models)
    c.model.attention = "auto"  # auto | xla | cudnn | splash | flash (fft.models.attention)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw | adafactor | sgd | lion
    c.optim.lr = 3e-4  # peak learning rate
    c.optim.schedule = "warmup_cosine"  # constant | warmup_cosine | wsd | rewarm | linear
    c.optim.warmup_steps = 10  # linear warmup steps from 0 to lr
    c.optim.decay_steps = 0  # steps of the decay phase (0 = until the last step)
    c.optim.min_lr_ratio = 0.1  # final lr as a fraction of peak
    c.optim.stable_fraction = 0.8  # wsd: fraction of steps at peak lr before the decay
    c.optim.rewarm_steps = ()  # rewarm: steps at which lr re-warms and re-decays
    c.optim.weight_decay = 0.0  # decoupled weight decay (not applied to norms, biases)
    c.optim.clip_norm = 1.0  # global gradient-norm clip (0 = off)
    c.optim.grad_accum = 1  # microbatches per optimizer step (batch_size must divide)
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.95  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.layer_decay = 1.0  # layer-wise lr decay factor (1 = off; transfer learning)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # LoRA rank (0 = off: train the weights `trainable` selects)
    c.lora.alpha = 16.0  # LoRA scaling numerator: scale = alpha / rank
    c.lora.targets = "q,k,v,o,gate,up,down"  # comma list of linear names, or 'all'
    c.lora.dropout = 0.0  # dropout on the LoRA input
    c.lora.rslora = False  # rank-stabilised scaling alpha / sqrt(rank)

    c.trainable = ".*"  # regex over param paths ('layers.3.mlp.up.kernel'); others frozen

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # training data: path, glob, dir, 'tfds:name/split' ('' = synthetic)
    c.data.eval = ""  # eval data, same forms ('' = synthetic held-out split)
    c.data.format = "text"  # text | instruction | chat | prompt_completion | preference | ...
    c.data.packing = True  # pack several examples per row (segment ids keep them apart)
    c.data.on_bad_record = "error"  # error | skip (skips are counted in the metrics)
    c.data.shuffle = True  # shuffle examples (seeded, resumable)
    c.data.prefetch = 2  # host batches built ahead in a background thread (0 = off)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel size (-1 = all devices left over)
    c.mesh.fsdp = 1  # fully-sharded data-parallel size (params sharded on 'embed')
    c.mesh.tensor = 1  # tensor-parallel size (heads / mlp / vocab sharded)

    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = ()  # (logical, mesh axes) overrides of fft.sharding.DEFAULT_RULES

    c.checkpoint_every = 50  # steps between checkpoints (0 = only at the end)
    c.keep_checkpoints = 2  # how many checkpoints to keep
    c.preemption_check_every = 10  # steps between multi-host SIGTERM checks (no JAX service)
    c.eval_every = 0  # steps between evals (0 = only before and after)
    c.log_every = 10  # steps between metric lines
    return c


_TYPES = {"steps": int, "batch_size": int, "seq_len": int, "seed": int}
_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "auto"),
    "model.param_dtype": ("float32", "bfloat16", "auto"),
    "model.quant": ("none", "int8", "nf4"),
    "model.remat": ("none", "full", "dots", "save_qkv", "offload"),
    "model.attention": ("auto", "xla", "cudnn", "splash", "flash"),
    "optim.name": ("adamw", "adafactor", "sgd", "lion"),
    "optim.schedule": ("constant", "warmup_cosine", "wsd", "rewarm", "linear"),
    "data.on_bad_record": ("error", "skip"),
}


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks values that need no devices; raises ConfigError naming the key and the fix.

    Unknown keys are caught earlier: configs are locked, so `--config.optim.lrr=1` fails in flag
    parsing (see `check_overrides`). Device-dependent checks (mesh sizes) live in fft.sharding.
    """
    if config.get("method") not in METHODS:
        raise ConfigError(f"config.method={config.get('method')!r} is not one of {METHODS}.")
    for key, typ in _TYPES.items():
        value = _get(config, key)
        low = 0 if key == "seed" else 1
        if not isinstance(value, typ) or isinstance(value, bool) or value < low:
            raise ConfigError(f"config.{key}={value!r} must be an int >= {low}.")
    for key, choices in _CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            raise ConfigError(f"config.{key}={value!r}: choose one of {choices}.")
    accum = config.optim.grad_accum
    if accum < 1 or config.batch_size % accum:
        raise ConfigError(
            f"config.optim.grad_accum={accum} must be >= 1 and divide "
            f"config.batch_size={config.batch_size}."
        )
    if config.optim.lr <= 0:
        raise ConfigError(f"config.optim.lr={config.optim.lr} must be > 0.")
    if config.lora.rank < 0:
        raise ConfigError(f"config.lora.rank={config.lora.rank} must be >= 0 (0 = LoRA off).")
    if config.model.quant != "none" and config.lora.rank == 0:
        raise ConfigError(
            f"config.model.quant={config.model.quant!r} quantizes the frozen base, which full "
            "fine-tuning cannot update: set --config.lora.rank=8 (or any rank > 0) for QLoRA, "
            "or --config.model.quant=none to train every weight."
        )
    for axis in ("data", "fsdp", "tensor"):
        size = config.mesh[axis]
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ConfigError(f"config.mesh.{axis}={size!r} must be a positive int or -1 (fill).")


def check_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Names an unknown `--config.x.y` override with the closest existing key.

    Args:
      config: the locked config the overrides apply to.
      overrides: dotted keys given on the command line (without the `config.` prefix).
    """
    known = sorted(flatten(config))
    for key in overrides:
        if key not in known and not any(k.startswith(key + ".") for k in known):
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean config.{close[0]}?" if close else ""
            raise ConfigError(f"Unknown config key config.{key}.{hint}")


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{'optim.lr': 3e-4, ...} for every leaf of a config."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _cast(old: Any, value: Any) -> Any:
    """`value` (a string from a command line) as the type of the field it replaces."""
    if not isinstance(value, str) or isinstance(old, str) or old is None:
        return value
    if isinstance(old, bool):
        return value.lower() in ("1", "true", "yes")
    return type(old)(value)


def set_values(
    config: ml_collections.ConfigDict, overrides: dict[str, Any], *, cast: bool = False
) -> ml_collections.ConfigDict:
    """Sets dotted keys (`{'optim.lr': 3e-4}`) of `config` in place and returns it.

    An unknown key is a ConfigError naming the closest real one. With `cast`, string values take
    the type of the field they replace ('3e-4' -> float), as on a command line.
    """
    check_overrides(config, list(overrides))
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = _cast(node[leaf], value) if cast else value
    return config


def parse_overrides(text: str) -> dict[str, str]:
    """'optim.lr=1e-3,rlhf.tasks=count' -> {'optim.lr': '1e-3', 'rlhf.tasks': 'count'}."""
    pairs = [kv.strip() for kv in text.split(",") if kv.strip()]
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not KEY=VALUE (e.g. 'optim.lr=1e-3').")
    return dict(kv.split("=", 1) for kv in pairs)


def _missing_config_file(path: str) -> ConfigError:
    """The error for a config file that does not exist, naming the closest one that does."""
    folder = os.path.dirname(path) or "."
    try:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    except OSError:
        files = []
    close = difflib.get_close_matches(os.path.basename(path), files, n=1, cutoff=0.6)
    if close:
        hint = f" Did you mean {os.path.join(os.path.dirname(path), close[0])}?"
    elif files:
        hint = f" Config files in {folder}: {', '.join(files)}."
    else:
        hint = " Give the path of a config file such as configs/domain.py."
    return ConfigError(f"config file {path} not found.{hint}")


def unknown_variant(path: str, variant: str, variants: tuple[str, ...]) -> ConfigError:
    """The error a config file raises for a variant it does not know, listing the valid ones.

    Args:
      path: the config file as the user would write it ('configs/domain.py').
      variant: the variant asked for (after the ':' of `--config=FILE:VARIANT`).
      variants: the variants the file defines ('' is the default, given without ':').

    Returns:
      A ConfigError to raise.
    """
    close = difflib.get_close_matches(variant, [v for v in variants if v], n=1)
    hint = f" Did you mean {path}:{close[0]}?" if close else ""
    names = ", ".join(repr(v) for v in variants if v)
    return ConfigError(
        f"{path}: unknown variant {variant!r}.{hint} Valid variants: {names} "
        f"(or none: --config={path} for the default)."
    )


def load_config(
    path: str, variant: str = "", *, cast: bool = False, **overrides: Any
) -> ml_collections.ConfigDict:
    """`get_config(variant)` of the config file `path` (e.g. 'configs/rlhf.py'), with dotted
    overrides passed as keyword arguments: `load_config(p, "smoke", **{"optim.lr": 1e-3})`;
    with `cast`, string values take their field's type as on a command line."""
    if not os.path.isfile(path):
        raise _missing_config_file(path)
    name = "_fft_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} is not a config file: it defines no get_config().")
    config = module.get_config(variant) if variant else module.get_config()
    return set_values(config, overrides, cast=cast)


# Smoke settings of the preference methods (reward model, DPO): a LoRA r=4 policy on fft:micro.
SMOKE_LORA = {
    "batch_size": 8,
    "seq_len": 128,
    "optim.lr": 1e-3,
    "lora.rank": 4,
    "checkpoint_every": 0,
}


def smoke(config: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
    """Shrinks a config for tests and notebooks: micro base, a few steps, tiny batches."""
    config.init_from = "fft:micro"
    config.steps = 6
    config.batch_size = 8  # divides the 8 fake devices of the tests
    config.seq_len = 64
    config.optim.warmup_steps = 2
    config.checkpoint_every = 3
    config.log_every = 2
    return set_values(config, overrides)


# Base models `fft:<name>` are built by the pretrain method from these settings. They live here
# (not in configs/) because fft.zoo builds them on first use from any working directory.
BASE_MODELS = {
    # name: (model preset, tokenizer vocab, steps, batch, seq_len, lr, general docs)
    "micro": ("micro", 512, 40, 8, 64, 3e-3, 2_000),
    "tiny": ("tiny", 4096, 150, 16, 256, 3e-3, 40_000),
}


def pretrain_config(name: str = "tiny") -> ml_collections.ConfigDict:
    """The config that builds base model `fft:<name>` (pretraining on the general corpus)."""
    preset, vocab, steps, batch, seq_len, lr, docs = BASE_MODELS[name]
    c = base_config()
    c.method = "pretrain"
    c.init_from = ""  # from scratch
    c.model.preset = preset
    c.steps = steps
    c.batch_size = batch
    c.seq_len = seq_len
    c.optim.lr = lr
    c.optim.warmup_steps = max(steps // 20, 2)
    c.optim.weight_decay = 0.1
    c.optim.min_lr_ratio = 0.1
    c.checkpoint_every = 100
    c.keep_checkpoints = 1
    c.log_every = max(steps // 20, 1)
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.vocab_size = vocab  # sentencepiece vocabulary trained on the general corpus
    c.pretrain.train_docs = docs  # synthetic general documents generated for training
    c.pretrain.eval_docs = 200  # held-out general documents for perplexity
    c.pretrain.world_seed = 0  # seed of the synthetic world (shared by every method)
    return c


def instruction_config() -> ml_collections.ConfigDict:
    """The instruction-tuning (SFT) recipe of configs/instruction.py; also builds `fft:tiny-sft`.

    It lives here (not only in configs/) for the same reason as `pretrain_config`: fft.zoo builds
    the instruction-tuned base models on first use from any working directory.
    """
    c = base_config()
    c.method = "instruction"  # fft.methods.instruction
    c.init_from = "fft:tiny"  # base model: 'fft:<preset>', a local HF model dir or an fft workdir
    c.steps = 240  # optimizer steps (8 min 40 s alone on 2 CPU cores, evals included)
    c.batch_size = 16  # packed rows per step
    c.seq_len = 256  # tokens per packed row
    c.optim.lr = 1e-3  # peak learning rate (full fine-tune)
    c.optim.warmup_steps = 20  # linear warmup steps
    c.optim.weight_decay = 0.0  # no decay: short runs, few steps
    c.checkpoint_every = 100  # steps between checkpoints
    c.keep_checkpoints = 1  # checkpoints kept in the workdir
    c.log_every = 20  # steps between train metric lines

    c.data.format = "instruction"  # instruction | chat | prompt_completion
    c.data.template = ""  # '' = default Alpaca template / the tokenizer's chat_template
    c.data.train_on_prompt = False  # True: loss on prompt tokens too
    c.data.truncation = "prompt"  # over-long examples: 'prompt' (cut prompt side first) | 'drop'

    c.instruction = ml_collections.ConfigDict()  # method keys: synthetic suite and evals
    c.instruction.world_seed = 0  # seed of the synthetic world (same as the base model's)
    c.instruction.tasks = ""  # comma list of synthetic tasks ('' = all of World.tasks)
    c.instruction.train_examples = 50_000  # synthetic training records (cycled if steps need more)
    c.instruction.eval_examples = 300  # held-out records for exact match and response ppl
    c.instruction.eval_batch_size = 100  # prompts per batched greedy generation call
    c.instruction.max_new_tokens = 0  # answer budget (0 = longest reference + 4 tokens)
    c.instruction.samples = 8  # predictions written to samples.jsonl before and after
    return c


def instruction_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks an instruction config to fft:micro and a few steps (smoke runs, `fft:micro-sft`)."""
    smoke(c)
    c.steps = 8  # a handful of steps
    c.batch_size = 8  # divides over the 8 fake CPU devices the tests use
    c.seq_len = 256  # the micro tokenizer spells most words out: examples are ~100 tokens
    c.instruction.train_examples = 200  # small synthetic set
    c.instruction.eval_examples = 16  # a few held-out prompts
    c.instruction.eval_batch_size = 16  # one generation call
    c.instruction.max_new_tokens = 16  # short answers: keeps the smoke eval fast
    return c


# Instruction-tuned base models `fft:<name>`: the SFT start of reward, RLHF and DPO runs, built by
# the instruction method on first use (fft.zoo) so that those configs run from a fresh checkout.
# name: the base model it is tuned from. The cache is keyed on fft.zoo.RECIPE_VERSION: bump it
# when instruction_config() changes, or the cached fft:tiny-sft keeps the old recipe.
SFT_MODELS = {"tiny-sft": "tiny", "micro-sft": "micro"}


def sft_config(name: str = "tiny-sft") -> ml_collections.ConfigDict:
    """The config that builds `fft:<name>` of SFT_MODELS: the instruction recipe on its base."""
    base = SFT_MODELS[name]
    c = instruction_config()
    if base == "micro":
        instruction_smoke(c)
    c.init_from = f"fft:{base}"
    c.checkpoint_every = 0  # the final checkpoint is the model
    return c


def known_models() -> tuple[str, ...]:
    """Every `fft:<name>` that fft.zoo can build: base models, then instruction-tuned ones."""
    return tuple(BASE_MODELS) + tuple(SFT_MODELS)


# Real pretrained models by name (resolved by fft.interop.hub from the `[models]` extra).
REAL_MODELS = ("smollm2-135m-instruct", "gemma3-270m")


def check_init_from(source: str, key: str = "config.init_from") -> None:
    """Raises ConfigError unless `source` can be resolved, without building or loading anything.

    Resolvable: '' (scratch), a known 'fft:<name>', 'pip:<distribution>', a name of
    `REAL_MODELS` or 'hf:org/name' (those checked when loaded), or an existing local path (an
    fft workdir, a HF model directory or a .gguf file).

    Args:
      source: the value of `init_from` (or any model source).
      key: how the error names the value (the config key or argument the user gave).
    """
    source = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not source or source.startswith(("pip:", "hf:")) or source in REAL_MODELS:
        return
    if source.startswith("fft:"):
        if source[len("fft:") :] not in known_models():
            raise ConfigError(
                f"{key}={source!r}: unknown preset; known: "
                + ", ".join(f"fft:{n}" for n in known_models())
            )
        return
    if not os.path.exists(os.path.expanduser(source)):
        raise ConfigError(
            f"{key}={source!r}: no such file or directory. Give an fft workdir (e.g. the "
            "workdir of your instruction run), a local HF model directory, or a preset such as "
            + " or ".join(f"'fft:{n}'" for n in ("tiny", "tiny-sft"))
            + "."
        )
