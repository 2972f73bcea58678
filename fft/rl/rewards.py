"""Rewards for RL: a reward model (scalar head on a decoder) and rewards as code.

Rewards as code (`--config.rlhf.reward=python:package.module:function`) are plain functions run
on the host:

    function(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]

`metadata[i]` is the prompt record sample i answers (its exact `output` or `answer`, its task).
`code_reward_fn` makes one the learner's RewardFn and turns any failure into one error naming
the prompt index. Built-in ones: `fft.rl.tasks` (the synthetic judge, sentiment, arithmetic).

Inside the learner, a reward function scores finished sequences:

    reward_fn(records, sequences, response_texts) -> scores [B] float32 (numpy)

`records` are the prompt records the samples answer (the judge needs their exact answers),
`sequences` the full prompt + response batch (tokens/positions/segment_ids `[B, P+N]`, the
reward model reads them), `response_texts` the decoded responses without the stop token.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from fft import pretrained, sharding
from fft.config_lib import ConfigError, FFTError
from fft.data.synthetic import World
from fft.models.config import ModelConfig
from fft.models.heads import ScalarHead
from fft.models.transformer import Transformer
from fft.train.recipe import ModelSpec

RewardFn = Callable[[Sequence[dict], dict, Sequence[str]], np.ndarray]

# The attribute under which a decoder carries its scalar reward head. Attaching the head to the
# Transformer (instead of wrapping it) keeps the backbone's param paths, so base weights load
# unchanged and a reward-model workdir still loads as a plain language model.
REWARD_HEAD = "reward_head"


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------


def attach_reward_head(model: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
    """Adds `model.reward_head = ScalarHead(d_model)` in place; returns the model."""
    setattr(model, REWARD_HEAD, ScalarHead(model.cfg.d_model, rngs=rngs))
    return model


def sequence_scores(model: nnx.Module, tokens, positions, segment_ids):
    """Reward-model scores `[B]`: the scalar head read at each row's last real token.

    Args:
      model: a decoder with a `reward_head` (see `attach_reward_head`).
      tokens, positions, segment_ids: `[B, T]`; segment 0 marks padding (left or right).

    Returns:
      f32 `[B]`.
    """
    hidden = model.hidden_states(tokens, positions, segment_ids)
    return getattr(model, REWARD_HEAD)(hidden, segment_ids)


@nnx.jit
def _scores_jit(model, tokens, positions, segment_ids):
    return sequence_scores(model, tokens, positions, segment_ids)


def reward_model_spec(workdir: str) -> tuple[ModelSpec, object]:
    """A reward model trained by `fft.methods.reward` (LoRA folded in), as a ModelSpec the
    Trainer places sharded, and its tokenizer.

    Args:
      workdir: the reward run's workdir (model.json, tokenizer/, checkpoints/).

    Returns:
      (ModelSpec of the model with `reward_head`, its tokenizer).
    """
    if not os.path.exists(os.path.join(workdir, "model.json")):
        raise FFTError(f"reward model {workdir!r}: no model.json; give a `reward` method workdir.")
    with open(os.path.join(workdir, "model.json")) as f:
        model_config = ModelConfig.from_dict(json.load(f))
    spec = pretrained.load_spec(workdir)

    def build():
        return attach_reward_head(Transformer(model_config, rngs=nnx.Rngs(0)), nnx.Rngs(1))

    def load_weights(abstract_state, shardings=None):
        flat = pretrained.read_fft_params(workdir)
        if not any(k.startswith(REWARD_HEAD + ".") for k in flat):
            raise FFTError(f"{workdir!r} has no {REWARD_HEAD}: is it a reward-model workdir?")
        return pretrained.place(flat, abstract_state, shardings, model_config=model_config,
                                source=workdir)  # fmt: skip

    return ModelSpec(build, load_weights, model_config), spec.tokenizer


def load_reward_model(workdir: str) -> tuple[nnx.Module, object]:
    """The reward model of `workdir` placed on the default devices, and its tokenizer (for
    scripts and tests; runs place it through their Trainer's mesh)."""
    from fft.train.trainer import place_model  # deferred: the Trainer imports rl's users

    spec, tokenizer = reward_model_spec(workdir)
    return place_model(spec, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])), tokenizer


def reward_model_fn(model: nnx.Module) -> RewardFn:
    """A RewardFn scoring the full prompt + response sequences with a reward model."""

    def fn(records, sequences, texts):
        del records, texts
        fields = [sequences[k] for k in ("tokens", "positions", "segment_ids")]
        s = _scores_jit(model, *sharding.put_like(fields, nnx.state(model)))
        return np.asarray(sharding.to_host(s), np.float32)

    return fn


# ---------------------------------------------------------------------------------------------
# Rewards as code
# ---------------------------------------------------------------------------------------------

PYTHON_PREFIX = "python:"
CodeReward = Callable[[list[str], list[str], list[dict]], Sequence[float]]


class RewardError(FFTError):
    """A reward function failed or returned something other than one finite float per prompt."""


def load_code_reward(spec: str) -> CodeReward:
    """The function `spec` = 'python:package.module:function' names.

    Raises:
      ConfigError: malformed spec, module not importable, or no such callable.
    """
    if not spec.startswith(PYTHON_PREFIX) or spec.count(":") != 2:
        raise ConfigError(f"reward {spec!r}: write it as 'python:package.module:function'.")
    _, module_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward {spec!r}: cannot import {module_name!r} ({e}).") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {module_name} has no function {fn_name!r}.")
    return fn


def prompt_text(record: dict) -> str:
    """The prompt a record asks, as text: its 'prompt', the instruction prompt, or the last
    user message."""
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    if "instruction" in record:
        return World.prompt_text({"input": "", **record})
    users = [m["content"] for m in record.get("messages", ()) if m.get("role") == "user"]
    return users[-1] if users else ""


def call_code_reward(fn: CodeReward, name: str, prompts, completions, metadata) -> np.ndarray:
    """`fn(prompts, completions, metadata)` as float32 `[B]`; any fault is one RewardError.

    When the batch call raises, the samples are retried one at a time to name the first prompt
    index that fails (the function's own traceback is not shown: the message carries it).
    """
    n = len(completions)
    try:
        out = fn(list(prompts), list(completions), list(metadata))
    except Exception as batch_error:  # noqa: BLE001 - any user-code fault becomes one error
        where, err = "the batch", batch_error
        for i in range(n):
            try:
                fn([prompts[i]], [completions[i]], [metadata[i]])
            except Exception as e:  # noqa: BLE001
                where, err = f"prompt {i}", e
                break
        raise RewardError(f"reward {name}: {where}: {type(err).__name__}: {err}") from None
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward {name}: must return a list of floats ({e}).") from None
    if len(values) != n:
        raise RewardError(f"reward {name}: returned {len(values)} values for {n} prompts.")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise RewardError(f"reward {name}: prompt {i}: the reward is {v} (not finite).")
    return np.asarray(values, np.float32)


def code_reward_fn(spec: str) -> RewardFn:
    """The learner's RewardFn of the code reward `spec` ('python:package.module:function')."""
    fn = load_code_reward(spec)

    def reward(records, sequences, texts):
        del sequences
        prompts = [prompt_text(r) for r in records]
        return call_code_reward(fn, spec, prompts, texts, records)

    return reward


def decode_responses(tokenizer, response_bn, mask_bn, stop_tokens=()) -> list[str]:
    """Response texts: the tokens under the mask, without a final stop token."""
    out = []
    for row, m in zip(np.asarray(response_bn), np.asarray(mask_bn), strict=True):
        ids = [int(t) for t in row[: int(m.sum())]]
        if ids and ids[-1] in stop_tokens:
            ids = ids[:-1]
        out.append(tokenizer.decode(ids))
    return out


def win_rate(scores_a, scores_b) -> float:
    """Fraction of prompts where a beats b (ties count half)."""
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.mean((a > b) + 0.5 * (a == b)))
