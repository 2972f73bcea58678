"""`ppo`: where one PPO iteration's time goes: rollout (sample + teacher-forced log-probs +
reward), preparation (advantages, KL), and the update (minibatch epochs of the train step).

    python -m fft.bench ppo --preset=micro --iters=3

The pieces are the ones `fft.methods.rlhf` assembles (policy + value head + LoRA, the reference
as the policy with adapters off, the synthetic judge as reward, `fft.rl.ppo.PPOBatches` as the
on-policy data source, `ppo.make_loss_fn` in the shared train step), driven here step by step
so that each part can be timed. Iteration 0 includes compilation.
"""

from __future__ import annotations

import functools

import numpy as np

from fft.bench import common
from fft.bench.common import emit, log


def _config(args):
    from fft import config_lib

    c = config_lib.base_config()
    c.seed = 0
    c.batch_size = args.batch
    c.seq_len = args.prompt + args.new
    c.lora.rank = args.lora_rank
    c.lora.alpha = 2.0 * args.lora_rank
    return c


def run_ppo(args) -> None:
    from fft.data.synthetic import World
    from fft.methods import rlhf
    from fft.rl import kl as kl_lib
    from fft.rl import ppo
    from fft.rl import rewards as rewards_lib
    from fft.rl import rollout as rollout_lib
    from fft.rl import tasks as tasks_lib

    config = _config(args)
    cfg0 = common.model_config(args.preset, config.seq_len)
    tokenizer = common.synthetic_tokenizer(cfg0.vocab_size, args.tokenizer_docs)
    cfg = cfg0.replace(vocab_size=tokenizer.vocab_size)
    world = World(0)
    records = world.instruction_data("train", max(4 * args.rollout_batch, 64))
    settings = {
        "preset": args.preset,
        "rollout_batch": args.rollout_batch,
        "minibatch": args.batch,
        "epochs": args.epochs,
        "prompt_len": args.prompt,
        "new_tokens": args.new,
        "lora_rank": args.lora_rank,
    }

    trainer = common.FFTTrainer(
        rlhf.policy_builder(cfg, config, value_head=True),
        ppo.make_loss_fn(),
        trainable=rlhf.policy_trainable(config),
        optim=common.default_optim(lr=1e-4, clip_norm=1.0),
    )
    collect_fn = functools.partial(
        rlhf._collect,
        ref_model=None if args.lora_rank > 0 else _frozen_copy(trainer),
        tokenizer=tokenizer,
        prompt_len=args.prompt,
        max_new_tokens=args.new,
        reward_fn=rewards_lib.code_reward_fn(tasks_lib.REWARDS["instructions"][0]),
        temperature=1.0,
        prompt_format="instruction",
    )
    data = ppo.PPOBatches(
        rollout_lib.PromptStream(records, args.rollout_batch, seed=0),
        collect_fn,
        minibatch_size=args.batch,
        epochs=args.epochs,
        controller=kl_lib.make_controller("adaptive", 0.05, 2.0, 10000),
    )
    emit("params", trainer.n_params, "count", trainable=trainer.n_trainable, **settings)

    rows = []
    for it in range(args.iters):
        pull_s, step_s, total = common.on_policy_iteration(data, trainer)
        rollout_s = float(data.stats["rollout_s"])
        row = {
            "iteration": it,
            "total_s": total,
            "rollout_s": rollout_s,
            "prepare_s": max(pull_s - rollout_s, 0.0),
            "update_s": step_s,
            "reward": data.stats.get("reward"),
            "kl": data.stats.get("kl"),
        }
        rows.append(row)
        log(f"iteration {it}: {row}")
        emit("ppo_iteration_s", total, "s",
             includes_compile=it == 0, **{k: v for k, v in row.items() if k != "total_s"},
             **settings)  # fmt: skip

    steady = rows[1:] or rows
    keys = ("total_s", "rollout_s", "prepare_s", "update_s")
    med = {k: float(np.median([r[k] for r in steady])) for k in keys}
    gen_tokens = args.rollout_batch * args.new
    emit(
        "ppo_time_split",
        med["rollout_s"] / med["total_s"],
        "fraction",
        what="rollout share of a steady-state iteration (median over iterations after the first)",
        rollout_s=med["rollout_s"],
        prepare_s=med["prepare_s"],
        update_s=med["update_s"],
        iteration_s=med["total_s"],
        update_fraction=med["update_s"] / med["total_s"],
        rollout_tokens_per_s=gen_tokens / med["rollout_s"],
        update_tokens_per_s=args.epochs
        * args.rollout_batch
        * (args.prompt + args.new)
        / max(med["update_s"], 1e-9),
        iterations=len(steady),
        **settings,
        **common.env_note(),
    )


def _frozen_copy(trainer):
    """Full fine-tuning: the reference is a frozen copy of the initial policy."""
    import jax
    from flax import nnx

    state = jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, trainer.state)
    return nnx.merge(trainer.graphdef, state.params, state.frozen)
