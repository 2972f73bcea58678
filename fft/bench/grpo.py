"""`grpo`: where one GRPO iteration's time goes on the arithmetic task: generation (sampling
the group's completions, their teacher-forced log-probs and the verifiable reward) vs training
(the minibatch epochs of the train step), with tokens/s of each.

    python -m fft.bench grpo --init_from=smollm2-135m-instruct --iters=3
    python -m fft.bench grpo --preset=micro --iters=2        # no init_from: a random model

The run is `configs/rlhf.py:arithmetic` with the flags below as overrides: the data source,
the loss and the trainable filter come from `fft.methods.rlhf.recipe`, and the step from
`fft.bench.common.prepare_step` (the Trainer's own assembly), so what is timed is what trains.
Iteration 0 includes compilation.
"""

from __future__ import annotations

import numpy as np

from fft.bench import common
from fft.bench.common import emit, log


def _config(args):
    """configs/rlhf.py:arithmetic with the bench's sizes."""
    from configs import rlhf as rlhf_configs

    c = rlhf_configs.get_config("arithmetic")
    c.seed = 0
    c.init_from = args.init_from
    c.model.preset = args.preset
    c.batch_size = args.batch
    c.seq_len = args.prompt + args.new
    c.lora.rank = args.lora_rank
    c.lora.alpha = 2.0 * args.lora_rank
    r = c.rlhf
    r.algo = args.algo
    r.chat = bool(args.init_from)  # a real (chat) model gets the config's chat prompts
    r.rollout_batch = args.rollout_batch
    r.group_size = args.group_size
    r.epochs = args.epochs
    r.max_new_tokens = args.new
    r.train_prompts = max(4 * args.rollout_batch, 64)
    return c


def _base(config, args):
    """The real model of `--init_from`, or a random `--preset` on the synthetic tokenizer."""
    from fft import zoo
    from fft.train import lm

    if config.init_from:
        config.init_from = zoo.resolve(config.init_from, what="--init_from")  # as fft.main does
        return lm.load_base(config)
    cfg = common.model_config(args.preset, config.seq_len)
    return lm.scratch_base(config, common.synthetic_tokenizer(cfg.vocab_size, args.tokenizer_docs))


class _Context:
    """What the recipe's `train_data` asks of the Trainer's context: the reference model
    (full fine-tuning only; LoRA's reference is the policy with adapters off)."""

    def __init__(self, trainer):
        self._trainer = trainer

    def model(self, name):
        if name != "reference":
            raise KeyError(f"fft.bench grpo has no {name!r} model (the reward is code)")
        import jax
        from flax import nnx

        state = jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, self._trainer.state)
        return nnx.merge(self._trainer.graphdef, state.params, state.frozen)


def _load(trainer, recipe) -> None:
    """Puts the base weights into the bench trainer's state (as `Trainer._start` does)."""
    from flax import nnx

    from fft.train.state import split_model

    load = recipe.model.load_weights
    if load is None:
        return
    loaded = load(nnx.state(nnx.eval_shape(recipe.model.build)), None)
    if loaded is None:
        return
    model = nnx.merge(trainer.graphdef, trainer.state.params, trainer.state.frozen)
    nnx.update(model, loaded)
    _, params, frozen = split_model(model, recipe.trainable)
    trainer.state = trainer.state.replace(params=params, frozen=frozen)


def run_grpo(args) -> None:
    from fft.methods import rlhf

    config = _config(args)
    recipe = rlhf.recipe(config, base=_base(config, args))
    settings = {
        "init_from": args.init_from or f"random:{args.preset}",
        "algo": args.algo,
        "rollout_batch": args.rollout_batch,
        "group_size": args.group_size,
        "minibatch": args.batch,
        "epochs": args.epochs,
        "prompt_len": args.prompt,
        "new_tokens": args.new,
        "lora_rank": args.lora_rank,
    }
    trainer = common.FFTTrainer(
        recipe.model.build,
        recipe.loss_fn,
        trainable=recipe.trainable,
        optim=common.default_optim(lr=1e-4, clip_norm=1.0),
    )
    _load(trainer, recipe)
    data = recipe.train_data(_Context(trainer))
    emit("params", trainer.n_params, "count", trainable=trainer.n_trainable, **settings)

    rows = []
    for it in range(args.iters):
        pull_s, step_s, total = common.on_policy_iteration(data, trainer)
        st = data.stats
        gen_s = float(st["rollout_s"])
        new_tokens = float(st["response_len"]) * args.rollout_batch  # sampled, not padded
        row = {
            "iteration": it,
            "total_s": total,
            "generation_s": gen_s,
            "prepare_s": max(pull_s - gen_s, 0.0),
            "training_s": step_s,
            "generation_tokens_per_s": new_tokens / max(gen_s, 1e-9),
            "training_tokens_per_s": args.epochs
            * args.rollout_batch
            * config.seq_len
            / max(step_s, 1e-9),
            "reward": st.get("reward"),
            "response_len": st.get("response_len"),
        }
        rows.append(row)
        log(f"iteration {it}: {row}")
        emit("grpo_iteration_s", total, "s", includes_compile=it == 0,
             **{k: v for k, v in row.items() if k != "total_s"}, **settings)  # fmt: skip

    steady = rows[1:] or rows
    keys = ("total_s", "generation_s", "prepare_s", "training_s",
            "generation_tokens_per_s", "training_tokens_per_s")  # fmt: skip
    med = {k: float(np.median([r[k] for r in steady])) for k in keys}
    emit(
        "grpo_time_split",
        med["generation_s"] / med["total_s"],
        "fraction",
        what="generation share of a steady-state iteration (median over iterations after the "
        "first)",
        generation_s=med["generation_s"],
        prepare_s=med["prepare_s"],
        training_s=med["training_s"],
        iteration_s=med["total_s"],
        training_fraction=med["training_s"] / med["total_s"],
        generation_tokens_per_s=med["generation_tokens_per_s"],
        training_tokens_per_s=med["training_tokens_per_s"],
        iterations=len(steady),
        **settings,
        **common.env_note(),
    )
