"""RLHF / RLVR: sample, score, and improve a policy against a reward, KL-bounded.

The objective is two registry names (`fft.rl.registry`): `rlhf.advantage` (gae, grpo, dr_grpo,
rloo) and `rlhf.loss` (ppo_clip, grpo, dr_grpo, dapo, gspo), or the `rlhf.algo` preset of both.

Recipe:
  policy     the init_from decoder (an SFT model), LoRA or full, plus a value head (critic
             estimators: gae)
  reference  the same weights frozen: with LoRA the policy with its adapters disabled (no second
             copy); without LoRA a separate frozen decoder, kept out of the checkpoints (it is
             re-read from init_from on resume)
  reward     `rlhf.reward`: 'judge' (the prompt set's own reward), a reward as code
             ('python:package.module:function', `fft.rl.rewards`) or a reward-model workdir
  data       `rlhf.prompts` of the synthetic world (`fft.rl.tasks`: the instruction tasks,
             review openings for controlled sentiment generation, or arithmetic word problems),
             or config.data.train records
  learner    fft.rl.ppo: rollouts as the loop's train_data (with DAPO's dynamic sampling and
             overlong shaping as switches), the registered loss as its loss_fn
  evals      greedy responses on held-out prompts: true reward (judge), win rate against the
             starting model, reward-model score; sampled responses: KL to the reference and
             their true reward
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from fft import config_lib
from fft.data import sources
from fft.data.synthetic import World
from fft.models.heads import ValueHead
from fft.models.transformer import Transformer
from fft.rl import evals, ppo, registry
from fft.rl import kl as kl_lib
from fft.rl import rewards as rewards_lib
from fft.rl import rollout as rollout_lib
from fft.rl import tasks as tasks_lib
from fft.train import lm
from fft.train.recipe import ModelSpec, Recipe, lm_batch_spec
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


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def prompt_records(config, world: World) -> tuple[list[dict], list[dict], str]:
    """(train records, eval records, prompt format) from config.data or the synthetic world."""
    c = config.rlhf
    tasks = [t.strip() for t in c.tasks.split(",") if t.strip()] or None
    if config.data.train:
        bad = config.data.on_bad_record
        train = sources.read_records(config.data.train, on_bad_record=bad)
        evals = train[: c.eval_prompts]
        if config.data.eval:
            evals = sources.read_records(config.data.eval, on_bad_record=bad, limit=c.eval_prompts)
        fmt = config.data.format if config.data.format != "text" else "instruction"
        return train, evals, fmt
    train = tasks_lib.prompts(world, c.prompts, "train", c.train_prompts, tasks)
    evals = tasks_lib.prompts(world, c.prompts, "test", c.eval_prompts, tasks)
    if c.get("chat", False):
        # The worked example is a train problem held out of the stream (never a test one).
        example, train = train[0], train[1:]
        return tasks_lib.as_chat(train, example), tasks_lib.as_chat(evals, example), "chat"
    return train, evals, tasks_lib.prompt_format(c.prompts)


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def _check(config) -> tuple[registry.Advantage, registry.Loss]:
    """Config errors before anything loads; returns the resolved estimator and loss."""
    c = config.rlhf
    tasks_lib.check(c.prompts, "rlhf.prompts")
    adv, loss = registry.resolve(c.algo, c.advantage, c.loss)
    group = c.group_size if adv.group else 1
    if adv.group and group < 2:
        raise config_lib.ConfigError(
            f"config.rlhf.group_size must be >= 2 for the {adv.name!r} advantage."
        )
    if c.dynamic_sampling and not adv.group:
        raise config_lib.ConfigError(
            "config.rlhf.dynamic_sampling drops groups of equal rewards: it needs a group "
            f"advantage ({', '.join(n for n, a in registry.ADVANTAGES.items() if a.group)})."
        )
    if c.rollout_batch % group or c.rollout_batch % config.batch_size:
        raise config_lib.ConfigError(
            f"config.rlhf.rollout_batch={c.rollout_batch} must be a multiple of "
            f"config.batch_size={config.batch_size} and of rlhf.group_size={group}."
        )
    if config.seq_len <= c.max_new_tokens:
        raise config_lib.ConfigError(
            f"config.seq_len={config.seq_len} must exceed rlhf.max_new_tokens={c.max_new_tokens} "
            "(prompts get seq_len - max_new_tokens tokens)."
        )
    if not c.temperature > 0:
        raise config_lib.ConfigError(
            f"config.rlhf.temperature={c.temperature}: rollouts must sample (> 0; 1.0 is the "
            "model's own distribution)."
        )
    if not 0 <= c.overlong_buffer <= c.max_new_tokens:
        raise config_lib.ConfigError(
            f"config.rlhf.overlong_buffer={c.overlong_buffer} must be in [0, max_new_tokens]."
        )
    return adv, loss


def reward_model(config, tokenizer):
    """The ModelSpec of `config.rlhf.reward` when it names a reward-model workdir, else None."""
    spec = config.rlhf.reward
    if spec == "judge" or spec.startswith(rewards_lib.PYTHON_PREFIX):
        return None
    rm, rm_tokenizer = rewards_lib.reward_model_spec(spec)
    if tokenizer is not None and rm_tokenizer.vocab_size != tokenizer.vocab_size:
        raise config_lib.ConfigError(
            f"reward model {spec!r} has vocabulary {rm_tokenizer.vocab_size}, the policy "
            f"{tokenizer.vocab_size}: train the reward model from the same base."
        )
    return rm


def rewards(config, train_records, eval_records, reward_model=None):
    """(reward_fn, eval_reward_fn, true_reward_fn) of the config, as RewardFns (or None);
    `reward_model()` gives the placed reward model when `config.rlhf.reward` names one.

    'judge' is the prompt set's own reward (`tasks.REWARDS`); with records of one's own it is
    the instruction judge, which needs their exact 'output'. The true reward (metrics) is the
    prompt set's; the eval reports `reward` too when training on something else.
    """
    c = config.rlhf
    if config.data.train:  # records of one's own: the judge knows instruction records only
        has_answers = all("output" in r for r in train_records[:8] + eval_records[:8])
        own = tasks_lib.REWARDS["instructions"] if has_answers else None
    else:
        own = tasks_lib.REWARDS[c.prompts]
    true_fn = rewards_lib.code_reward_fn(own[1]) if own else None
    spec = c.reward
    if spec == "judge":
        if own is None:
            raise config_lib.ConfigError(
                "config.rlhf.reward='judge' needs records with an exact 'output'; give a "
                "reward as code ('python:package.module:function') or a reward-model workdir."
            )
        spec = own[0]
    if spec.startswith(rewards_lib.PYTHON_PREFIX):
        reward_fn = rewards_lib.code_reward_fn(spec)
        return reward_fn, (None if own and spec == own[1] else reward_fn), true_fn
    reward_fn = rewards_lib.reward_model_fn(reward_model())
    return reward_fn, reward_fn, true_fn


def recipe(config, workdir=None, *, base: lm.Base | None = None) -> Recipe:
    """The RL Recipe (PPO / GRPO / every registry objective; see the module docstring)."""
    del workdir
    adv, loss = _check(config)
    c = config.rlhf
    group = c.group_size if adv.group else 1
    world = tasks_lib.world(c.world_seed)
    base = base or lm.load_base(config)
    tokenizer = base.tokenizer
    prompt_len = config.seq_len - c.max_new_tokens
    lora = config.lora.rank > 0
    extra = {}
    if not lora:  # LoRA: the reference is the policy with its adapters off (no second copy)
        extra["reference"] = evals.reference_spec(
            lm.frozen_model_config(base.model_config, config), base.load_weights
        )
    rm = reward_model(config, tokenizer)
    if rm is not None:
        extra["reward"] = rm
    built = {}

    def setup(ctx):
        """Records and rewards, shared by the train data and the evals."""
        if not built:
            train_records, eval_records, fmt = prompt_records(config, world)
            fns = rewards(config, train_records, eval_records, lambda: ctx.model("reward"))
            built.update(train=train_records, eval=eval_records, fmt=fmt, fns=fns)
        return built

    def ref_model(ctx):
        return None if lora else ctx.model("reference")

    def train_data(ctx):
        b = setup(ctx)
        reward_fn, _, true_fn = b["fns"]
        collect_fn = functools.partial(
            _collect,
            ref_model=ref_model(ctx),
            tokenizer=tokenizer,
            prompt_len=prompt_len,
            max_new_tokens=c.max_new_tokens,
            reward_fn=reward_fn,
            true_reward_fn=true_fn,
            temperature=c.temperature,
            prompt_format=b["fmt"],
        )
        controller = kl_lib.make_controller(c.kl_controller, c.kl_coef, c.kl_target, c.kl_horizon)
        stream = rollout_lib.PromptStream(b["train"], c.rollout_batch // group, seed=config.seed)
        return ppo.PPOBatches(
            stream,
            collect_fn,
            minibatch_size=config.batch_size,
            epochs=c.epochs,
            controller=controller,
            seed=config.seed,
            group_size=group,
            prepare_kwargs=dict(
                advantage=adv.name,
                kl_estimator=c.kl_estimator,
                gamma=c.gamma,
                lam=c.lam,
                whiten=c.whiten,
            ),
            dynamic_sampling=c.dynamic_sampling,
            max_sampling_rounds=c.max_sampling_rounds,
            overlong_buffer=c.overlong_buffer,
            overlong_penalty=c.overlong_penalty,
        )

    def evaluate(ctx):
        b = setup(ctx)
        _, eval_reward_fn, true_fn = b["fns"]
        return evals.make_evaluate(
            b["eval"],
            b["fmt"],
            tokenizer,
            prompt_len=prompt_len,
            max_new_tokens=c.max_new_tokens,
            ref_model=ref_model(ctx),
            true_reward_fn=true_fn,
            reward_fn=eval_reward_fn,
            seed=config.seed + 1,
        )

    loss_fn = ppo.make_loss_fn(
        loss=loss.name,
        clip_eps=c.clip_eps,
        clip_eps_high=c.clip_eps_high,
        value_clip=c.value_clip,
        vf_coef=c.vf_coef,
        ent_coef=c.ent_coef,
        # Without a critic the KL is not in the reward: it is a term of the loss instead.
        kl_loss_coef=0.0 if adv.critic else c.kl_coef,
        use_value=adv.critic,
        temperature=c.temperature,
        max_len=c.max_new_tokens,
    )
    f32 = jnp.float32
    per_token = ("old_logprobs", "ref_logprobs", "advantages", "returns", "values")
    return Recipe(
        method="rlhf",
        model=ModelSpec(
            policy_builder(base.model_config, config, value_head=adv.critic),
            base.load_weights,
            base.model_config,
        ),  # fmt: skip
        loss_fn=loss_fn,
        train_data=train_data,
        batch_spec=lm_batch_spec(
            config.seq_len,
            *[(name, (config.seq_len,), f32) for name in per_token],
            ("rollout_mean_len", (), f32),
        ),
        evaluate=evaluate,
        trainable=policy_trainable(config),
        tokenizer=tokenizer,
        extra_models=extra,
    )


def _collect(policy, records, rng, **kwargs):
    return rollout_lib.collect(policy, kwargs.pop("ref_model"), records, rng=rng, **kwargs)
