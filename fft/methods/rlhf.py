"""RLHF with PPO (or GRPO): sample, score, and improve a policy against a reward, KL-bounded.

Recipe:
  policy     the init_from decoder (an SFT model), LoRA or full, plus a value head (PPO only)
  reference  the same weights frozen: with LoRA the policy with its adapters disabled (no second
             copy); without LoRA a separate frozen decoder, kept out of the checkpoints (it is
             re-read from init_from on resume)
  reward     `rlhf.reward`: 'judge' (the synthetic world's true reward) or a reward-model workdir
  data       prompts of the synthetic instruction tasks (or config.data.train records)
  learner    fft.rl.ppo: rollouts as the loop's train_data, the clipped PPO loss as its loss_fn
  evals      greedy responses on held-out prompts: true reward (judge), win rate against the
             starting model, KL to the reference on sampled responses, reward-model score
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft import config_lib
from fft.data import sources
from fft.data.synthetic import World
from fft.generate import generate_tokens
from fft.models import lora as lora_lib
from fft.models.heads import ValueHead
from fft.models.transformer import Transformer
from fft.rl import kl as kl_lib
from fft.rl import ppo
from fft.rl import rewards as rewards_lib
from fft.rl import rollout as rollout_lib
from fft.train import lm, loop
from fft.train.state import trainable_filter_from_config

# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def policy_builder(model_config, config, *, value_head: bool):
    """`() -> Transformer` (+ LoRA, + `value_head` for PPO), random init, jit-traceable."""

    def build():
        rngs = nnx.Rngs(config.seed)
        model = lm.add_lora(Transformer(model_config, rngs=rngs), config, rngs)
        if value_head:
            setattr(model, rollout_lib.VALUE_HEAD, ValueHead(model_config.d_model, rngs=rngs))
        return model

    return build


def policy_trainable(config):
    """Trainable filter: `config.trainable` / LoRA as every method, plus the value head."""
    base = trainable_filter_from_config(config.trainable, config.lora.rank)

    def trainable(path, variable) -> bool:
        if not isinstance(variable, nnx.Param):
            return False
        return (bool(path) and str(path[0]) == rollout_lib.VALUE_HEAD) or base(path, variable)

    return trainable


def reference_model(base: lm.Base) -> Transformer:
    """A frozen copy of the base decoder (full fine-tuning only; LoRA runs disable adapters)."""
    if base.load_weights is None:
        raise config_lib.ConfigError(
            "rlhf needs starting weights: set config.init_from (an SFT workdir or 'fft:<name>')."
        )

    def build():
        return Transformer(base.model_config, rngs=nnx.Rngs(0))

    loaded = base.load_weights(nnx.state(nnx.eval_shape(build)), None)
    model = build()
    nnx.update(model, loaded)
    return model


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def prompt_records(config, world: World) -> tuple[list[dict], list[dict], str]:
    """(train records, eval records, prompt format) from config.data or the synthetic world."""
    c = config.rlhf
    tasks = [t.strip() for t in c.tasks.split(",") if t.strip()] or None
    if config.data.train:
        src = sources.open_source(config.data.train, on_bad_record=config.data.on_bad_record)
        train = [src[i] for i in range(len(src))]
        ev = sources.open_source(config.data.eval) if config.data.eval else None
        evals = [ev[i] for i in range(len(ev))][: c.eval_prompts] if ev else train[: c.eval_prompts]
        fmt = config.data.format if config.data.format != "text" else "instruction"
        return train, evals, fmt
    train = world.instruction_data("train", c.train_prompts, tasks)
    evals = world.instruction_data("test", c.eval_prompts, tasks)
    return train, evals, "instruction"


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def make_evaluate(records, fmt, tokenizer, *, prompt_len, max_new_tokens, ref_model, judge,
                  reward_fn, seed):  # fmt: skip
    """`evaluate(model)`: true reward, win rate vs the starting model, KL, reward-model score."""
    prompt_bp, mask_bp = rollout_lib.encode_prompts(records, tokenizer, prompt_len, fmt)
    stops = (tokenizer.eos_id,) if tokenizer.eos_id >= 0 else ()
    gen = functools.partial(
        generate_tokens, max_new_tokens=max_new_tokens, stop_tokens=stops, rng=jax.random.key(seed)
    )
    start = {}

    def judged(out):
        texts = rewards_lib.decode_responses(tokenizer, out.tokens, out.mask, stops)
        seqs = rollout_lib.sequences(
            prompt_bp, mask_bp, np.asarray(out.tokens), np.asarray(out.mask)
        )
        if judge is None:
            return seqs, texts, None
        return seqs, texts, np.asarray([judge(r, t) for r, t in zip(records, texts, strict=True)])

    def evaluate(model) -> dict:
        out = gen(model, prompt_bp, mask_bp, temperature=0.0)
        seqs, texts, true = judged(out)
        if "true" not in start:  # the starting model's greedy answers, once per process
            if ref_model is None:
                with lora_lib.disable_lora(model):
                    start["true"] = judged(gen(model, prompt_bp, mask_bp, temperature=0.0))[2]
            else:
                start["true"] = judged(gen(ref_model, prompt_bp, mask_bp, temperature=0.0))[2]
        metrics = {"response_len": float(np.asarray(out.lengths).mean())}
        if true is not None:
            metrics["true_reward"] = float(true.mean())
            metrics["win_rate"] = rewards_lib.win_rate(true, start["true"])
        if reward_fn is not None:
            metrics["reward"] = float(np.mean(reward_fn(records, seqs, texts)))
        # KL(pi || pi_ref) per sequence on responses sampled from the policy (k1 summed).
        sampled = gen(model, prompt_bp, mask_bp, temperature=1.0)
        s_seqs = rollout_lib.sequences(
            prompt_bp, mask_bp, np.asarray(sampled.tokens), np.asarray(sampled.mask)
        )
        logp, ref_logp, _ = rollout_lib.teacher_forced(
            model, ref_model, {k: jnp.asarray(v) for k, v in s_seqs.items()}
        )
        m = s_seqs["loss_mask"]
        metrics["kl"] = float((np.asarray(kl_lib.kl_k1(logp, ref_logp)) * m).sum(1).mean())
        return metrics

    return evaluate


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def _check(config) -> None:
    c = config.rlhf
    if c.algo not in ("ppo", "grpo"):
        raise config_lib.ConfigError(f"config.rlhf.algo={c.algo!r}: choose 'ppo' or 'grpo'.")
    group = c.group_size if c.algo == "grpo" else 1
    if c.algo == "grpo" and group < 2:
        raise config_lib.ConfigError("config.rlhf.group_size must be >= 2 for GRPO.")
    if c.rollout_batch % (group * 1) or c.rollout_batch % config.batch_size:
        raise config_lib.ConfigError(
            f"config.rlhf.rollout_batch={c.rollout_batch} must be a multiple of "
            f"config.batch_size={config.batch_size} and of rlhf.group_size={group}."
        )
    if config.seq_len <= c.max_new_tokens:
        raise config_lib.ConfigError(
            f"config.seq_len={config.seq_len} must exceed rlhf.max_new_tokens={c.max_new_tokens} "
            "(prompts get seq_len - max_new_tokens tokens)."
        )


def run(config, workdir: str) -> dict:
    """Trains a policy with PPO / GRPO; returns the results dict (see the module docstring)."""
    _check(config)
    c = config.rlhf
    grpo = c.algo == "grpo"
    group = c.group_size if grpo else 1
    world = World(c.world_seed)
    base = lm.load_base(config)
    tokenizer = base.tokenizer
    train_records, eval_records, fmt = prompt_records(config, world)
    prompt_len = config.seq_len - c.max_new_tokens

    ref_model = None if config.lora.rank > 0 else reference_model(base)
    has_answers = all("output" in r for r in train_records[:8] + eval_records[:8])
    judge = world.judge if has_answers else None
    if c.reward == "judge":
        if judge is None:
            raise config_lib.ConfigError(
                "config.rlhf.reward='judge' needs records with an exact 'output'; give a "
                "reward-model workdir instead."
            )
        reward_fn, eval_reward_fn = rewards_lib.judge_fn(judge), None
    else:
        rm, rm_tokenizer = rewards_lib.load_reward_model(c.reward)
        if rm_tokenizer.vocab_size != tokenizer.vocab_size:
            raise config_lib.ConfigError(
                f"reward model {c.reward!r} has vocabulary {rm_tokenizer.vocab_size}, the policy "
                f"{tokenizer.vocab_size}: train the reward model from the same base."
            )
        reward_fn = eval_reward_fn = rewards_lib.reward_model_fn(rm)
    true_fn = rewards_lib.judge_fn(judge) if judge is not None else None

    collect_fn = functools.partial(
        _collect,
        ref_model=ref_model,
        tokenizer=tokenizer,
        prompt_len=prompt_len,
        max_new_tokens=c.max_new_tokens,
        reward_fn=reward_fn,
        true_reward_fn=true_fn,
        temperature=c.temperature,
        prompt_format=fmt,
    )
    controller = kl_lib.make_controller(c.kl_controller, c.kl_coef, c.kl_target, c.kl_horizon)
    stream = rollout_lib.PromptStream(train_records, c.rollout_batch // group, seed=config.seed)
    train_data = ppo.PPOBatches(
        stream,
        collect_fn,
        minibatch_size=config.batch_size,
        epochs=c.epochs,
        controller=controller,
        seed=config.seed,
        group_size=group,
        prepare_kwargs=dict(
            kl_estimator=c.kl_estimator,
            gamma=c.gamma,
            lam=c.lam,
            whiten=c.whiten,
            grpo_normalize=c.grpo_normalize,
        ),
    )
    loss_fn = ppo.make_loss_fn(
        clip_eps=c.clip_eps,
        value_clip=c.value_clip,
        vf_coef=c.vf_coef,
        ent_coef=c.ent_coef,
        kl_loss_coef=c.kl_coef if grpo else 0.0,
        use_value=not grpo,
    )
    evaluate = make_evaluate(
        eval_records,
        fmt,
        tokenizer,
        prompt_len=prompt_len,
        max_new_tokens=c.max_new_tokens,
        ref_model=ref_model,
        judge=judge,
        reward_fn=eval_reward_fn,
        seed=config.seed + 1,
    )
    return loop.train(
        config,
        workdir,
        method="rlhf",
        build_model=policy_builder(base.model_config, config, value_head=not grpo),
        loss_fn=loss_fn,
        train_data=train_data,
        evaluate=evaluate,
        trainable=policy_trainable(config),
        load_weights=base.load_weights,
        tokenizer=tokenizer,
        model_config=base.model_config,
    )


def _collect(policy, records, rng, **kwargs):
    return rollout_lib.collect(policy, kwargs.pop("ref_model"), records, rng=rng, **kwargs)
