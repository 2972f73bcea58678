"""Reward model: a scalar head on a decoder, trained from K-way rankings or pairs.

Recipe:
  model  the init_from decoder (LoRA or full) + `reward_head` (fft.models.heads.ScalarHead, read
         at each sequence's last real token); attached to the decoder so its param paths are the
         base's and the workdir loads back as a reward model (fft.rl.rewards.load_reward_model)
  data   'ranking' records {prompt, responses[K], ranking[K]} (synthetic: candidates ranked by
         the judge with annotator noise) or 'preference' pairs {prompt, chosen, rejected}
  loss   rankings: Plackett-Luce ('pl') or Bradley-Terry over all implied pairs ('bt');
         pairs: Bradley-Terry; optional margin; + centring * mean(score^2) (fft.rl.objectives)
  evals  held-out pairwise accuracy on noise-free judge pairs, and their BT loss
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft import config_lib, sharding
from fft.data import labels, pipeline, sources
from fft.data.synthetic import World
from fft.models.transformer import Transformer
from fft.rl import objectives
from fft.rl import rewards as rewards_lib
from fft.train import lm
from fft.train.recipe import ModelSpec, Recipe, lm_batch_spec, token_fields
from fft.train.state import trainable_filter_from_config

FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")


def builder(model_config, config):
    """`() -> Transformer` + LoRA + `reward_head`, random init."""

    def build():
        rngs = nnx.Rngs(config.seed)
        model = lm.add_lora(Transformer(model_config, rngs=rngs), config, rngs)
        return rewards_lib.attach_reward_head(model, rngs)

    return build


def trainable(config):
    """`config.trainable` / LoRA as every method, plus the reward head (always trained)."""
    base = trainable_filter_from_config(config.trainable, config.lora.rank)

    def fn(path, variable) -> bool:
        if not isinstance(variable, nnx.Param):
            return False
        return (bool(path) and str(path[0]) == rewards_lib.REWARD_HEAD) or base(path, variable)

    return fn


def _scores(model, batch, prefix):
    x = {f: batch[prefix + f] for f in FIELDS}
    shape = x["tokens"].shape
    flat = {f: v.reshape(-1, shape[-1]) for f, v in x.items()}  # [B(,K),T] -> [B*K,T]
    s = rewards_lib.sequence_scores(model, flat["tokens"], flat["positions"], flat["segment_ids"])
    return s.reshape(shape[:-1])


def make_loss_fn(loss: str, margin: float, centering: float):
    """LossFn over ranking batches (cand_*, ranks) or pair batches (chosen_*, rejected_*)."""
    if loss not in ("pl", "bt"):
        raise config_lib.ConfigError(f"config.reward.loss={loss!r}: choose 'pl' or 'bt'.")

    def loss_fn(model, batch, rng):
        del rng
        if "ranks" in batch:
            s_bk = _scores(model, batch, "cand_")
            ranks = batch["ranks"]
            if loss == "pl":
                value = objectives.plackett_luce_loss(s_bk, ranks)
            else:
                value = objectives.all_pairs_bradley_terry_loss(s_bk, ranks, margin=margin)
                # A mean over the valid pairs, whose number varies between microbatches.
                pairs = objectives.ranked_pairs(ranks).sum()
            centre = objectives.reward_centering_penalty(s_bk, ranks >= 0)
            best = jnp.argmin(jnp.where(ranks >= 0, ranks, 1 << 20), axis=1)
            top = jnp.argmax(jnp.where(ranks >= 0, s_bk, -jnp.inf), axis=1)
            aux = {"top1_accuracy": (best == top).astype(jnp.float32).mean()}
            if loss == "bt":
                aux["loss_weight"] = pairs
        else:
            s_c, s_r = _scores(model, batch, "chosen_"), _scores(model, batch, "rejected_")
            value = objectives.bradley_terry_loss(s_c, s_r, margin=margin)
            centre = objectives.reward_centering_penalty(jnp.stack([s_c, s_r]))
            aux = {"pairwise_accuracy": objectives.pairwise_accuracy(s_c, s_r)}
        aux["rank_loss"] = value
        aux["centering"] = centre
        return value + centering * centre, aux

    return loss_fn


@nnx.jit
def _pair_scores(model, batch):
    return _scores(model, batch, "chosen_"), _scores(model, batch, "rejected_")


def make_evaluate(pair_batches):
    """`evaluate(model) -> {pairwise_accuracy, loss}` over held-out pair batches."""

    def evaluate(model) -> dict:
        correct, total, nll = 0.0, 0.0, 0.0
        for batch in pair_batches:
            # The same batches on every process, placed like the (sharded) model; the scores
            # are gathered, so every process computes the same accuracy.
            scores = _pair_scores(model, sharding.put_like(batch, nnx.state(model)))
            s_c, s_r = (np.asarray(s, np.float64) for s in sharding.to_host(scores))
            real = batch["chosen_segment_ids"].any(1)  # the last batch is padded
            correct += float(((s_c > s_r) + 0.5 * (s_c == s_r))[real].sum())
            nll += float(np.logaddexp(0.0, -(s_c - s_r))[real].sum())
            total += float(real.sum())
        return {"pairwise_accuracy": correct / max(total, 1.0), "loss": nll / max(total, 1.0)}

    return evaluate


def recipe(config, workdir=None, *, base: lm.Base | None = None) -> Recipe:
    """The reward-model Recipe: a scalar head on `config.init_from`, trained on rankings or
    preference pairs."""
    del workdir
    c = config.reward
    world = World(c.world_seed)
    base = base or lm.load_base(config)
    tokenizer = base.tokenizer
    fmt = config.data.format if config.data.train else "ranking"
    if config.data.train and fmt not in ("ranking", "preference"):
        raise config_lib.ConfigError(
            f"config.data.format={fmt!r}: a reward model trains on 'ranking' or 'preference'."
        )
    pad = lambda: tokenizer.pad_id if tokenizer.pad_id >= 0 else 0  # noqa: E731

    def train_data(ctx):
        if config.data.train:
            records = sources.open_source(
                config.data.train, on_bad_record=config.data.on_bad_record
            )
            if fmt == "ranking":  # fft.label's file: undone and skipped judgements left out
                records = labels.for_training(records)
        else:
            records = world.preference_data("train", c.train_records, k=c.k, noise=c.noise)
        # A list of sources is a mixture: one source here, so wrap it.
        return pipeline.make_train_iterator(
            [records],
            pipeline.make_encoder(fmt, tokenizer, max_len=config.seq_len),
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            packing=False,  # one ranking / pair per row
            shuffle=config.data.shuffle,
            seed=config.seed,
            pad_id=pad(),
            on_bad_record=config.data.on_bad_record,
            shard_index=ctx.shard.index,
            shard_count=ctx.shard.count,
        )

    def evaluate(ctx):
        del ctx
        if config.data.eval:
            eval_records = sources.open_source(config.data.eval)
        else:  # noise-free judge pairs: accuracy against the true preference
            eval_records = world.pairwise_data("test", c.eval_pairs, noise=0.0)
        eval_batches = pipeline.make_eval_batches(
            [eval_records],
            pipeline.make_encoder("preference", tokenizer, max_len=config.seq_len),
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            pad_id=pad(),
        )
        return make_evaluate(eval_batches)

    return Recipe(
        method="reward",
        model=ModelSpec(builder(base.model_config, config), base.load_weights, base.model_config),
        loss_fn=make_loss_fn(c.loss, c.margin, c.centering),
        train_data=train_data,
        batch_spec=batch_spec(config, fmt),
        evaluate=evaluate,
        trainable=trainable(config),
        tokenizer=tokenizer,
    )


def batch_spec(config, fmt: str):
    """The global batch of ranking (`cand_*` [B, K, T], `ranks` [B, K]) or pair
    (`chosen_*`, `rejected_*` [B, T]) rows."""
    if fmt == "preference":
        return lm_batch_spec(config.seq_len, prefixes=("chosen_", "rejected_"))
    k, t = int(config.reward.k), int(config.seq_len)

    def spec(batch: int) -> dict:
        out = {
            n: jax.ShapeDtypeStruct((batch, k, t), dt) for n, dt in token_fields("cand_").items()
        }
        out["ranks"] = jax.ShapeDtypeStruct((batch, k), jnp.int32)
        return out

    return spec
