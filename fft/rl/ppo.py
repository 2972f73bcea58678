"""The PPO learner (and GRPO as a switch of it) on top of the shared train loop.

The shared loop pulls batches from `train_data` and applies one jitted `train_step` per batch.
PPO fits that shape as an on-policy data source plus a loss:

    PPOBatches (train_data)                               make_loss_fn (loss of train_step)
      every `epochs * minibatches` pulls:                   clipped policy loss (+ entropy bonus)
        rollout with the *current* weights (rollout.py)     + vf_coef * clipped value loss (PPO)
        rewards: score at the last token - beta * KL_t      + kl_coef * k3 KL to the reference
        advantages: GAE + whitening (PPO) or                  (GRPO: the KL is in the loss)
                    group-relative (GRPO, no critic)
        KL controller update (Ziegler et al. 2019)
      otherwise: the next shuffled minibatch of it

The data source needs the weights the loop is training: the loop calls
`train_data.bind_state(graphdef, state)` before every pull, and the binding is dropped once the
batch is served (the step donates that state). Its `get_state()` holds the prompt
position, the KL coefficient, the iteration and, mid-iteration, the rest of the rollout, so a
resumed run continues with identical batches.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft.rl import advantages as adv_lib
from fft.rl import kl as kl_lib
from fft.rl import objectives
from fft.rl import rollout as rollout_lib

# Fields of a learner minibatch beyond the four Batch fields, all [B, T] float32.
PPO_FIELDS = ("old_logprobs", "ref_logprobs", "advantages", "returns", "values")


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def make_loss_fn(
    *,
    clip_eps: float = 0.2,
    value_clip: float = 0.2,
    vf_coef: float = 0.1,
    ent_coef: float = 0.0,
    kl_loss_coef: float = 0.0,
    use_value: bool = True,
    temperature: float = 1.0,
):
    """LossFn `(model, batch, rng) -> (loss, aux)` for PPO / GRPO minibatches.

        loss = L_clip(logp, old_logp, A) - ent_coef * H
               + vf_coef * L_V(V, old_V, R)              (use_value)
               + kl_loss_coef * mean_t k3(logp, ref_logp)  (GRPO's in-loss KL)

    Args:
      clip_eps: PPO ratio clip.
      value_clip: value clip range (0 = unclipped value loss).
      vf_coef: weight of the value loss.
      ent_coef: weight of the entropy bonus.
      kl_loss_coef: weight of the KL-to-reference term in the loss.
      use_value: train a value head (PPO) or not (GRPO).
      temperature: the rollouts' sampling temperature; the policy's logits are divided by it,
        as they were for the old log-probs (`rollout.teacher_forced`), so the first update's
        ratio is exactly 1.
    """

    def loss_fn(model, batch, rng):
        del rng
        logits, logp, values = rollout_lib.policy_outputs(
            model, batch["tokens"], batch["positions"], batch["segment_ids"], temperature
        )
        mask = batch["loss_mask"]
        pg, clip_frac, approx_kl = objectives.ppo_policy_loss(
            logp, batch["old_logprobs"], batch["advantages"], mask, clip_eps=clip_eps
        )
        entropy = adv_lib.masked_mean(
            rollout_lib.shift_right(objectives.entropy_from_logits(logits)), mask
        )
        loss = pg - ent_coef * entropy
        aux = {
            # Every term is a mean over response tokens: grad accumulation weighs by their count.
            "loss_weight": jnp.sum(mask.astype(jnp.float32)),
            "policy_loss": pg,
            "clip_frac": clip_frac,
            "approx_kl": approx_kl,
            "entropy": entropy,
        }
        if use_value:
            v_loss, v_clip = objectives.value_loss(
                values, batch["values"], batch["returns"], mask, clip=value_clip
            )
            loss = loss + vf_coef * v_loss
            aux.update(value_loss=v_loss, value_clip_frac=v_clip)
        if kl_loss_coef:
            kl = adv_lib.masked_mean(kl_lib.kl_k3(logp, batch["ref_logprobs"]), mask)
            loss = loss + kl_loss_coef * kl
            aux["kl_loss"] = kl
        return loss, aux

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Rollout -> learner batch
# ---------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=("kl_estimator", "gamma", "lam", "whiten", "group_size", "grpo_normalize"),
)
def _advantages(
    logp,
    ref,
    values,
    scores,
    m,
    kl_coef,
    *,
    kl_estimator,
    gamma,
    lam,
    whiten,
    group_size,
    grpo_normalize,
):
    """The numeric core of `prepare`, one compiled call (a rollout's shapes are fixed, so it
    compiles once): (advantages, returns, values, sequence KL), each masked to the response."""
    values = values * m
    if group_size > 1:
        adv_b = adv_lib.group_relative(scores, group_size, normalize=grpo_normalize)
        advantages, returns, values = adv_b[:, None] * m, jnp.zeros_like(m), jnp.zeros_like(m)
    else:
        kl_tok = kl_lib.kl_penalty(logp, ref, kl_estimator) * m
        rewards = adv_lib.terminal_rewards(scores, m) - kl_coef * kl_tok
        advantages, returns = adv_lib.gae(rewards, values, m, gamma=gamma, lam=lam)
        if whiten:
            advantages = adv_lib.whiten(advantages, m)
    return advantages, returns, values, (kl_lib.kl_k1(logp, ref) * m).sum(1)


def prepare(
    ro: rollout_lib.Rollout,
    *,
    kl_coef: float,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    group_size: int = 0,
    grpo_normalize: bool = True,
) -> tuple[dict, dict]:
    """Rewards, advantages and returns of a rollout, as a `[B, T]` learner batch.

    PPO (group_size 0):  r_t = s * [t last] - beta * kl_t;  (A, R) = GAE(r, V);  A whitened.
    GRPO (group_size G): A_t = group_relative(s)  for every response token; no values.

    Args:
      ro: the rollout.
      kl_coef: beta (the controller's current value); PPO only.
      kl_estimator: per-token KL estimator of the penalty ('k1' | 'k2' | 'k3').
      gamma, lam: GAE discount and lambda.
      whiten: whiten PPO advantages over the batch's response tokens.
      group_size: G > 1 switches to GRPO (rows of one prompt are adjacent).
      grpo_normalize: divide group-relative advantages by the group std.

    Returns:
      (batch with the Batch fields + PPO_FIELDS as numpy, stats of scalar floats).
    """
    p = ro.prompt_len
    m = jnp.asarray(ro.batch["loss_mask"][:, p:], jnp.float32)
    logp, ref = jnp.asarray(ro.logp[:, p:]), jnp.asarray(ro.ref_logp[:, p:])
    advantages, returns, values, seq_kl = _advantages(
        logp,
        ref,
        jnp.asarray(ro.values[:, p:]),
        jnp.asarray(ro.scores, jnp.float32),
        m,
        jnp.float32(kl_coef),
        kl_estimator=kl_estimator,
        gamma=gamma,
        lam=lam,
        whiten=whiten,
        group_size=group_size,
        grpo_normalize=grpo_normalize,
    )

    def full(x_bn):  # [B, N] response view -> [B, P+N] token-aligned
        return np.pad(np.asarray(x_bn, np.float32), ((0, 0), (p, 0)))

    batch = dict(ro.batch)
    batch.update(
        old_logprobs=np.asarray(ro.logp, np.float32) * ro.batch["loss_mask"],
        ref_logprobs=np.asarray(ro.ref_logp, np.float32) * ro.batch["loss_mask"],
        advantages=full(advantages),
        returns=full(returns),
        values=full(values),
    )
    seq_kl = np.asarray(seq_kl)
    lengths = np.asarray(m).sum(1)
    stats = {
        "reward": float(np.mean(ro.scores)),
        "kl": float(seq_kl.mean()),
        "kl_coef": float(kl_coef),
        "response_len": float(lengths.mean()),
        # Sampler vs teacher-forced log-probs of the same tokens: ~0 unless something is off.
        "logp_gap": float(np.max(np.abs(ro.sample_logp - np.asarray(logp * m)))),
        "rollout_s": float(ro.seconds),
    }
    if ro.true_scores is not None:
        stats["true_reward"] = float(np.mean(ro.true_scores))
    return batch, stats


# ---------------------------------------------------------------------------------------------
# The on-policy data source
# ---------------------------------------------------------------------------------------------


class PPOBatches:
    """`train_data` for the shared loop: minibatches of rollouts sampled from the current policy.

    Args:
      prompts: a PromptStream yielding `rollout_batch / group_size` records per rollout.
      collect_fn: `(policy_module, records, rng) -> Rollout` (rollout.collect with settings bound).
      minibatch_size: rows per optimizer step (config.batch_size).
      epochs: passes over each rollout.
      controller: a KL controller (its value is beta).
      seed: seeds sampling and minibatch shuffling (with the iteration number).
      group_size: samples per prompt (GRPO when > 1).
      prepare_kwargs: passed to `prepare`.
    """

    def __init__(
        self,
        prompts: rollout_lib.PromptStream,
        collect_fn: Callable,
        *,
        minibatch_size: int,
        epochs: int,
        controller,
        seed: int = 0,
        group_size: int = 1,
        prepare_kwargs: dict | None = None,
    ):
        self.prompts, self.collect_fn = prompts, collect_fn
        self.minibatch_size, self.epochs = int(minibatch_size), int(epochs)
        self.controller, self.seed = controller, int(seed)
        self.group_size = max(int(group_size), 1)
        self.prepare_kwargs = dict(prepare_kwargs or {})
        self.rollout_batch = prompts.batch_size * self.group_size
        if self.rollout_batch % self.minibatch_size:
            raise ValueError(
                f"rollout batch {self.rollout_batch} is not a multiple of batch_size "
                f"{self.minibatch_size}"
            )
        self.iteration = 0  # rollouts collected so far
        self.pos = 0  # minibatches of the current rollout already served
        self.buffer: dict | None = None
        self.stats: dict[str, float] = {}
        self._bound = None
        self._update_t0: float | None = None

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * (self.rollout_batch // self.minibatch_size)

    # -- the loop hook ----------------------------------------------------------------------

    def bind_state(self, graphdef, state) -> None:
        """Gives the data source the weights being trained (called by the loop before `next`)."""
        self._bound = (graphdef, state)

    def _policy(self) -> nnx.Module:
        if self._bound is None:
            raise RuntimeError("PPOBatches needs the train state: call bind_state() first")
        graphdef, state = self._bound
        return nnx.merge(graphdef, state.params, state.frozen)

    # -- iteration --------------------------------------------------------------------------

    def __iter__(self):
        return self

    def _schedule(self) -> list[np.ndarray]:
        """Row indices of each minibatch of the current rollout (fixed by seed and iteration)."""
        out = []
        for epoch in range(self.epochs):
            perm = np.random.default_rng([self.seed, self.iteration, epoch]).permutation(
                self.rollout_batch
            )
            out += list(perm.reshape(-1, self.minibatch_size))
        return out

    def _new_rollout(self) -> None:
        now = time.time()
        update_s = now - self._update_t0 if self._update_t0 is not None else 0.0
        records = next(self.prompts)
        if self.group_size > 1:
            records = [r for r in records for _ in range(self.group_size)]
        rng = jax.random.fold_in(jax.random.key(self.seed), self.iteration)
        ro = self.collect_fn(self._policy(), records, rng)
        group = self.group_size if self.group_size > 1 else 0
        batch, stats = prepare(
            ro, kl_coef=self.controller.value, group_size=group, **self.prepare_kwargs
        )
        self.controller.update(stats["kl"], self.rollout_batch)
        stats["update_s"] = update_s
        self.stats, self.buffer, self.pos = stats, batch, 0
        self._update_t0 = time.time()

    def __next__(self) -> dict:
        if self.buffer is None or self.pos >= self.steps_per_rollout:
            if self.buffer is not None:
                self.iteration += 1
            self._new_rollout()
        idx = self._schedule()[self.pos]
        self.pos += 1
        self._bound = None  # the state is donated by the step that consumes this batch
        return {k: v[idx] for k, v in self.buffer.items()}

    # -- checkpointing ----------------------------------------------------------------------

    def get_state(self) -> dict:
        """JSON-able state; mid-rollout it carries the rollout itself (lists)."""
        state = {
            "prompts": self.prompts.get_state(),
            "kl": self.controller.get_state(),
            "iteration": self.iteration,
            "pos": self.pos,
            "buffer": None,
            "stats": self.stats,
        }
        if self.buffer is not None and self.pos < self.steps_per_rollout:
            state["buffer"] = {
                k: {"dtype": str(v.dtype), "data": v.tolist()} for k, v in self.buffer.items()
            }
        elif self.buffer is not None:  # finished: the next pull starts a new rollout
            state["iteration"], state["pos"] = self.iteration + 1, 0
        return state

    def set_state(self, state: dict) -> None:
        self.prompts.set_state(state["prompts"])
        self.controller.set_state(state["kl"])
        self.iteration, self.pos = int(state["iteration"]), int(state["pos"])
        self.stats = dict(state.get("stats") or {})
        buf = state.get("buffer")
        self.buffer = (
            {k: np.asarray(v["data"], dtype=v["dtype"]) for k, v in buf.items()} if buf else None
        )
