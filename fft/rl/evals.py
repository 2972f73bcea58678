"""Evaluation of aligned policies: true reward, win rate against the start, KL to the reference.

Shared by the RLHF (PPO/GRPO) and DPO methods. Responses are greedy on held-out prompts and
scored by the judge (the synthetic world's true reward); KL is measured on responses *sampled*
from the policy, where it is an expectation under the policy as its definition asks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft import sharding
from fft.config_lib import ConfigError
from fft.models.transformer import Transformer
from fft.rl import kl as kl_lib
from fft.rl import rewards as rewards_lib
from fft.rl import rollout as rollout_lib
from fft.sampling import generate_tokens
from fft.train.recipe import ModelSpec


def reference_spec(model_config, load_weights) -> ModelSpec:
    """The starting decoder as a ModelSpec: frozen, outside the train state, placed sharded by
    the Trainer (re-read from init_from on resume).

    Only needed without LoRA: a LoRA policy's reference is itself with the adapters off
    (`without_adapters`).

    Args:
      model_config: the base ModelConfig.
      load_weights: the base's `(abstract_state, shardings) -> State` (fft.train.lm.Base).
    """
    if load_weights is None:
        raise ConfigError(
            "this method needs starting weights: set config.init_from (an SFT workdir or "
            "'fft:<name>')."
        )
    return ModelSpec(
        lambda: Transformer(model_config, rngs=nnx.Rngs(0)), load_weights, model_config
    )


def without_adapters(model):
    """A copy of a LoRA model whose `lora_b` are zero: exactly the base model, and (unlike
    `disable_lora`) the same graph, so the compiled generation loop is reused."""
    graphdef, state = nnx.split(model)
    zero = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(path) else x, state
    )
    return nnx.merge(graphdef, zero)


def make_evaluate(
    records,
    fmt: str,
    tokenizer,
    *,
    prompt_len: int,
    max_new_tokens: int,
    ref_model,
    true_reward_fn=None,
    reward_fn=None,
    seed: int = 0,
):
    """`evaluate(model) -> {true_reward, true_reward_sampled, win_rate, kl, reward, ...}`.

    `true_reward` scores greedy answers; `true_reward_sampled` scores the temperature-1 samples
    the KL is measured on (the policy PPO actually trains; greedy decoding of an open-ended
    continuation can be degenerate, e.g. a repeated word).

    Args:
      records: held-out prompt records.
      fmt: their prompt format (`fft.data.formats.encode_prompt`).
      tokenizer: the policy's tokenizer.
      prompt_len, max_new_tokens: P and N.
      ref_model: the reference decoder, or None: the evaluated model with LoRA disabled.
      true_reward_fn: a RewardFn, the true reward (None: no true_reward / win_rate).
      reward_fn: a RewardFn (reward model) to report as `reward` (None: not reported).
      seed: sampling seed of the KL estimate (fixed, so evals are comparable).

    Returns:
      The evaluate function. The starting model's greedy answers (the win-rate opponent) are
      computed once, at the first call.
    """
    prompt_bp, mask_bp = rollout_lib.encode_prompts(records, tokenizer, prompt_len, fmt)
    stops = (tokenizer.eos_id,) if tokenizer.eos_id >= 0 else ()
    gen = functools.partial(
        generate_tokens, max_new_tokens=max_new_tokens, stop_tokens=stops, rng=jax.random.key(seed)
    )
    start = {}

    def judged(out):
        tokens, mask = sharding.to_host((out.tokens, out.mask))
        texts = rewards_lib.decode_responses(tokenizer, tokens, mask, stops)
        seqs = rollout_lib.sequences(prompt_bp, mask_bp, tokens, mask)
        if true_reward_fn is None:
            return seqs, texts, None
        return seqs, texts, np.asarray(true_reward_fn(records, seqs, texts), np.float32)

    def evaluate(model) -> dict:
        out = gen(model, prompt_bp, mask_bp, temperature=0.0)
        seqs, texts, true = judged(out)
        if "true" not in start:
            opponent = ref_model if ref_model is not None else without_adapters(model)
            start["true"] = judged(gen(opponent, prompt_bp, mask_bp, temperature=0.0))[2]
        metrics = {"response_len": float(sharding.to_host(out.lengths).mean())}
        if true is not None:
            metrics["true_reward"] = float(true.mean())
            metrics["win_rate"] = rewards_lib.win_rate(true, start["true"])
        if reward_fn is not None:
            metrics["reward"] = float(np.mean(reward_fn(records, seqs, texts)))
        s_seqs, _, s_true = judged(gen(model, prompt_bp, mask_bp, temperature=1.0))
        if s_true is not None:
            metrics["true_reward_sampled"] = float(s_true.mean())
        logp, ref_logp, _ = sharding.to_host(
            rollout_lib.teacher_forced(
                model, ref_model, sharding.put_like(s_seqs, nnx.state(model))
            )
        )
        m = s_seqs["loss_mask"]
        # KL(pi || pi_ref) per sequence: k1 summed over the response, averaged over prompts.
        metrics["kl"] = float((np.asarray(kl_lib.kl_k1(logp, ref_logp)) * m).sum(1).mean())
        return metrics

    return evaluate
