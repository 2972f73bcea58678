"""DPO / IPO: align a policy directly on preference pairs, no reward model, no sampling.

Recipe:
  data       chosen / rejected pairs (synthetic judge-ranked pairs, or every pair a K-way ranking
             implies, of `dpo.prompts` (`fft.rl.tasks`: instructions or review continuations);
             or config.data.train JSONL in 'preference' / 'ranking' format)
  reference  the starting weights; their sequence log-probs of every pair are computed ONCE
             before training (cached in WORKDIR/dpo_reference.npz) and ride along in the batches,
             so training never runs a second model
  loss       fft.rl.objectives.dpo_loss (sigmoid, optional label smoothing) or ipo_loss
             (squared, on length-averaged log-probs)
  evals      true reward (judge) and win rate against the starting model on held-out prompts,
             KL to the reference (fft.rl.evals)
"""

from __future__ import annotations

import hashlib
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft import config_lib, sharding
from fft.data import labels, pipeline, sources
from fft.data.synthetic import World
from fft.rl import evals, objectives
from fft.rl import rewards as rewards_lib
from fft.rl import tasks as tasks_lib
from fft.train import lm, losses
from fft.train.recipe import Recipe, lm_batch_spec

SIDES = ("chosen", "rejected")
FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")


# ---------------------------------------------------------------------------------------------
# Data: pairs, encoded once into rows
# ---------------------------------------------------------------------------------------------


def ranking_to_pairs(record: dict) -> list[dict]:
    """Every (better, worse) pair of a ranking record (`ranking[i]` = rank of responses[i]).

    Returns:
      preference records `{prompt, chosen, rejected, ...other fields}`.
    """
    responses, ranks = record["responses"], record["ranking"]
    rest = {k: v for k, v in record.items() if k not in ("responses", "ranking", "order")}
    out = []
    for i, j in itertools.combinations(range(len(responses)), 2):
        if ranks[i] == ranks[j]:
            continue
        good, bad = (i, j) if ranks[i] < ranks[j] else (j, i)
        out.append(rest | {"chosen": responses[good], "rejected": responses[bad]})
    return out


def pair_records(config, world: World) -> list[dict]:
    """Training pairs from config.data.train or the synthetic world (config.dpo.data)."""
    c = config.dpo
    if config.data.train:
        records = sources.read_records(config.data.train, on_bad_record=config.data.on_bad_record)
        if config.data.format == "ranking":
            records = [p for r in labels.for_training(records) for p in ranking_to_pairs(r)]
        return records
    if c.prompts == "reviews":
        if c.data != "pairs":
            raise config_lib.ConfigError(
                "config.dpo.prompts='reviews' comes as synthetic pairs only: set "
                "config.dpo.data='pairs'."
            )
        return world.review_pairs("train", c.train_pairs, noise=c.noise)
    if c.data == "pairs":
        return world.pairwise_data("train", c.train_pairs, noise=c.noise)
    if c.data == "rankings":
        ranked = world.preference_data("train", c.train_pairs, k=c.k, noise=c.noise)
        return [p for r in ranked for p in ranking_to_pairs(r)]
    raise config_lib.ConfigError(f"config.dpo.data={c.data!r}: choose 'pairs' or 'rankings'.")


def encode_rows(records, tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """All pairs as arrays `[N, T]` (chosen_* / rejected_*), padding rows removed."""
    encode = pipeline.make_encoder("preference", tokenizer, max_len=seq_len)
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
    batches = pipeline.make_eval_batches(
        [records], encode, seq_len=seq_len, batch_size=64, packing=False, pad_id=pad
    )
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    real = rows["chosen_segment_ids"].any(1) & rows["rejected_segment_ids"].any(1)
    return {k: v[real] for k, v in rows.items()}


class RowStream:
    """Endless seeded minibatches over fixed rows; `get_state`/`set_state` resume exactly.

    `batch_size` is the global batch: every process draws the same global minibatch (the rows
    are the same on every process) and yields its `batch_size / process_count` rows of it, so
    no pair is read twice and 1 and N processes train on the same minibatches. The state is a
    position in the global order, the same on every process.
    """

    def __init__(
        self,
        rows: dict[str, np.ndarray],
        batch_size: int,
        *,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.rows, self.batch_size, self.seed = rows, int(batch_size), int(seed)
        self.n = len(next(iter(rows.values())))
        if self.n < self.batch_size:
            raise config_lib.ConfigError(f"{self.n} preference pairs < batch_size {batch_size}.")
        self.process_count = jax.process_count() if process_count is None else process_count
        self.process_index = jax.process_index() if process_index is None else process_index
        self.local = pipeline.rows_per_process(self.batch_size, self.process_count)
        self.epoch, self.index = 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.index + self.batch_size > self.n:  # drop the remainder, start a new epoch
            self.epoch, self.index = self.epoch + 1, 0
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        start = self.index + self.process_index * self.local
        idx = perm[start : start + self.local]
        self.index += self.batch_size
        return {k: v[idx] for k, v in self.rows.items()}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


# ---------------------------------------------------------------------------------------------
# Log-probs and the loss
# ---------------------------------------------------------------------------------------------


def pair_logprobs(model, batch, chunk: int = losses.LOGPROB_CHUNK):
    """Summed response log-probs and response lengths of both sides, in one forward pass.

    The log-probs are computed `chunk` positions at a time (`losses.chunked_token_logprobs`).

    Returns:
      (logp_chosen [B], logp_rejected [B], len_chosen [B], len_rejected [B]).
    """
    cat = {f: jnp.concatenate([batch[f"{s}_{f}"] for s in SIDES]) for f in FIELDS}
    hidden = model.hidden_states(cat["tokens"], cat["positions"], cat["segment_ids"])
    # Chunked: the [2B, T, V] f32 logits of both sides never exist at once.
    lp = losses.chunked_token_logprobs(hidden, model.logits, cat["tokens"], chunk=chunk)
    lp = lp * cat["loss_mask"]
    b = batch["chosen_tokens"].shape[0]
    seq, n = lp.sum(1), cat["loss_mask"].sum(1)
    return seq[:b], seq[b:], n[:b], n[b:]


@nnx.jit
def _pair_logprobs_jit(model, batch):
    return pair_logprobs(model, batch)


def reference_logprobs(ref_model, rows, batch_size: int = 32) -> dict[str, np.ndarray]:
    """`ref_chosen_logp`, `ref_rejected_logp` `[N]` of every row under the reference."""
    n = len(rows["chosen_tokens"])
    out = {"ref_chosen_logp": [], "ref_rejected_logp": []}
    for i in range(0, n, batch_size):
        chunk = {k: v[i : i + batch_size] for k, v in rows.items()}
        k = len(chunk["chosen_tokens"])
        if k < batch_size:  # pad to one shape: one compile
            chunk = {key: np.concatenate([v, np.zeros_like(v[: batch_size - k])]) for key, v in
                     chunk.items()}  # fmt: skip
        placed = sharding.put_like(chunk, nnx.state(ref_model))
        c, r = sharding.to_host(_pair_logprobs_jit(ref_model, placed)[:2])
        out["ref_chosen_logp"].append(c[:k])
        out["ref_rejected_logp"].append(r[:k])
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def make_loss_fn(
    loss: str, beta: float, label_smoothing: float = 0.0, chunk: int = losses.LOGPROB_CHUNK
):
    """LossFn for DPO ('dpo', summed log-probs) or IPO ('ipo', length-averaged log-probs).

    `chunk`: positions per chunk of the policy's log-probs (`losses.chunked_token_logprobs`).
    """
    if loss not in ("dpo", "ipo"):
        raise config_lib.ConfigError(f"config.dpo.loss={loss!r}: choose 'dpo' or 'ipo'.")

    def loss_fn(model, batch, rng):
        del rng
        pi_c, pi_r, n_c, n_r = pair_logprobs(model, batch, chunk)
        ref_c, ref_r = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
        if loss == "ipo":
            n_c, n_r = jnp.maximum(n_c, 1.0), jnp.maximum(n_r, 1.0)
            value, aux = objectives.ipo_loss(pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r,
                                             beta=beta)  # fmt: skip
        else:
            value, aux = objectives.dpo_loss(
                pi_c, pi_r, ref_c, ref_r, beta=beta, label_smoothing=label_smoothing
            )
        return value, aux

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def reference_key(rows: dict[str, np.ndarray], reference: nnx.Module) -> str:
    """A hash of the encoded pairs and the reference model's identity.

    The rows carry the data, `seq_len` (their width) and the tokenizer (their ids); the reference
    is fingerprinted by its config and a strided sample of every weight (cheap at any size, and
    any retrained or other base differs in it).
    """
    h = hashlib.sha256()
    for k in sorted(rows):
        a = np.ascontiguousarray(rows[k])
        h.update(f"{k}{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    h.update(repr(getattr(reference, "cfg", None)).encode())
    for path, x in sorted(nnx.to_flat_state(nnx.state(reference)), key=lambda kv: str(kv[0])):
        w = np.asarray(x[...]).ravel()
        h.update(str(path).encode())
        h.update(w[:: max(1, w.size // 4096)].astype(np.float32).tobytes())
    return h.hexdigest()[:16]


def _cached_reference(path, key: str, compute) -> dict[str, np.ndarray]:
    """Reference log-probs from `path` when it was saved under `key`, else computed and saved."""
    if os.path.exists(path):
        with np.load(path) as f:
            cached = {k: f[k] for k in f.files}
        if str(cached.pop("key", "")) == key:
            print(f"[dpo] reference log-probs read from {path} (key {key}).", flush=True)
            return cached
        print(f"[dpo] {path} is for other pairs or another reference: recomputing.", flush=True)
    ref = compute()
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, key=np.array(key), **ref)
        os.replace(tmp, path)
    print(f"[dpo] reference log-probs computed and cached in {path} (key {key}).", flush=True)
    return ref


def recipe(config, workdir=None, *, base: lm.Base | None = None) -> Recipe:
    """The DPO / IPO Recipe: pairs from `dpo.prompts`, reference log-probs computed once (and
    cached in the workdir) from the starting weights."""
    del workdir
    c = config.dpo
    tasks_lib.check(c.prompts, "dpo.prompts", ("instructions", "reviews"))
    world = tasks_lib.world(c.world_seed)
    base = base or lm.load_base(config)
    tokenizer = base.tokenizer
    lora = config.lora.rank > 0
    # Full fine-tuning: the reference is a second (sharded) copy of the start; LoRA: the policy
    # itself with its adapters off (no second copy).
    extra = (
        {}
        if lora
        else {
            "reference": evals.reference_spec(
                lm.frozen_model_config(base.model_config, config), base.load_weights
            )
        }
    )

    def reference(ctx):
        return evals.without_adapters(ctx.policy()) if lora else ctx.model("reference")

    def train_data(ctx):
        rows = encode_rows(pair_records(config, world), tokenizer, config.seq_len)
        ref_model = reference(ctx)
        rows.update(_cached_reference(
            os.path.join(ctx.workdir, "dpo_reference.npz"),
            reference_key(rows, ref_model),
            lambda: reference_logprobs(ref_model, rows),
        ))  # fmt: skip
        print(f"[dpo] {len(rows['chosen_tokens'])} pairs.", flush=True)
        return RowStream(rows, config.batch_size, seed=config.seed,
                         process_index=ctx.shard.index, process_count=ctx.shard.count)  # fmt: skip

    def evaluate(ctx):
        return evals.make_evaluate(
            tasks_lib.prompts(world, c.prompts, "test", c.eval_prompts),
            tasks_lib.prompt_format(c.prompts),
            tokenizer,
            prompt_len=config.seq_len - c.max_new_tokens,
            max_new_tokens=c.max_new_tokens,
            ref_model=None if lora else ctx.model("reference"),  # LoRA: adapters off
            true_reward_fn=rewards_lib.code_reward_fn(tasks_lib.REWARDS[c.prompts][1]),
            seed=config.seed + 1,
        )

    return Recipe(
        method="dpo",
        model=lm.model_spec(base, config),
        loss_fn=make_loss_fn(c.loss, c.beta, c.label_smoothing),
        train_data=train_data,
        batch_spec=lm_batch_spec(
            config.seq_len,
            ("ref_chosen_logp", (), jnp.float32),
            ("ref_rejected_logp", (), jnp.float32),
            prefixes=tuple(f"{side}_" for side in SIDES),
        ),
        evaluate=evaluate,
        trainable=lm.trainable_filter(config),
        tokenizer=tokenizer,
        extra_models=extra,
    )
