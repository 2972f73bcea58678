"""Rewards for RL: a reward model (scalar head on a decoder) and programmatic judges.

A reward function scores finished sequences:

    reward_fn(records, sequences, response_texts) -> scores [B] float32 (numpy)

`records` are the prompt records the samples answer (the judge needs their exact answers),
`sequences` the full prompt + response batch (tokens/positions/segment_ids `[B, P+N]`, the
reward model reads them), `response_texts` the decoded responses without the stop token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft import pretrained
from fft.config_lib import FFTError
from fft.models.config import ModelConfig
from fft.models.heads import ScalarHead
from fft.models.transformer import Transformer

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


def load_reward_model(workdir: str) -> tuple[nnx.Module, object]:
    """Loads a reward model trained by `fft.methods.reward` (LoRA folded in).

    Args:
      workdir: the reward run's workdir (model.json, tokenizer/, checkpoints/).

    Returns:
      (model with `reward_head`, its tokenizer).
    """
    if not os.path.exists(os.path.join(workdir, "model.json")):
        raise FFTError(f"reward model {workdir!r}: no model.json; give a `reward` method workdir.")
    with open(os.path.join(workdir, "model.json")) as f:
        model_config = ModelConfig.from_dict(json.load(f))
    spec = pretrained.load_spec(workdir)
    flat = pretrained.read_fft_params(workdir)
    if not any(k.startswith(REWARD_HEAD + ".") for k in flat):
        raise FFTError(f"{workdir!r} has no {REWARD_HEAD}: is it a reward-model workdir?")

    def build():
        return attach_reward_head(Transformer(model_config, rngs=nnx.Rngs(0)), nnx.Rngs(1))

    abstract = nnx.state(nnx.eval_shape(build))
    loaded = pretrained.place(flat, abstract, model_config=model_config, source=workdir)
    model = build()  # real init for any leaf the checkpoint lacks (none for a reward run)
    nnx.update(model, loaded)
    return model, spec.tokenizer


def reward_model_fn(model: nnx.Module) -> RewardFn:
    """A RewardFn scoring the full prompt + response sequences with a reward model."""

    def fn(records, sequences, texts):
        del records, texts
        s = _scores_jit(
            model,
            jnp.asarray(sequences["tokens"]),
            jnp.asarray(sequences["positions"]),
            jnp.asarray(sequences["segment_ids"]),
        )
        return np.asarray(s, np.float32)

    return fn


# ---------------------------------------------------------------------------------------------
# Programmatic judges
# ---------------------------------------------------------------------------------------------


def judge_fn(judge: Callable[[dict, str], float]) -> RewardFn:
    """A RewardFn from `judge(record, response_text) -> float` (e.g. the synthetic world's)."""

    def fn(records, sequences, texts):
        del sequences
        return np.asarray([judge(r, t) for r, t in zip(records, texts, strict=True)], np.float32)

    return fn


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
