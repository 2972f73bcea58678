"""The policy-gradient learner (PPO, GRPO and every `fft.rl.registry` objective) on the loop.

The shared loop pulls batches from `train_data` and applies one jitted `train_step` per batch.
PPO fits that shape as an on-policy data source plus a loss:

    PPOBatches (train_data)                               make_loss_fn (loss of train_step)
      every `epochs * minibatches` pulls:                   registered policy loss (- entropy)
        rollout with the *current* weights (rollout.py)     + vf_coef * clipped value loss (critic)
          (dynamic sampling: refilled with groups of        + kl_coef * k3 KL to the reference
          unequal rewards; overlong shaping of scores)        (no critic: the KL is in the loss)
        rewards: score at the last token - beta * KL_t      reduced by the loss's reducer
        advantages: the registered estimator (GAE +
                    whitening, or group-relative)
        KL controller update (Ziegler et al. 2019)
      otherwise: the next shuffled minibatch of it

The data source needs the weights the loop is training: the loop calls
`train_data.bind_state(graphdef, state)` before every pull, and the binding is dropped once the
batch is served (the step donates that state). Its `get_state()` holds the prompt
position, the KL coefficient, the iteration and, mid-iteration, the rest of the rollout, so a
resumed run continues with identical batches.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft.data.pipeline import rows_per_process
from fft.rl import advantages as adv_lib
from fft.rl import kl as kl_lib
from fft.rl import objectives, registry
from fft.rl import rollout as rollout_lib
from fft.train import losses

# Fields of a learner minibatch beyond the four Batch fields: [B, T] float32, and
# `rollout_mean_len` [B] (the rollout's mean response length, on every row: DAPO's reducer).
PPO_FIELDS = ("old_logprobs", "ref_logprobs", "advantages", "returns", "values")


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def make_loss_fn(
    *,
    loss: str = "ppo_clip",
    clip_eps: float = 0.2,
    clip_eps_high: float = 0.0,
    value_clip: float = 0.2,
    vf_coef: float = 0.1,
    ent_coef: float = 0.0,
    kl_loss_coef: float = 0.0,
    use_value: bool = True,
    temperature: float = 1.0,
    max_len: int = 0,
    chunk: int = losses.LOGPROB_CHUNK,
):
    """LossFn `(model, batch, rng) -> (loss, aux)` for PPO / GRPO-family minibatches.

    Every term is per token, summed, then reduced by the registered loss's reducer
    (`fft.rl.registry`), which also gives `aux['loss_weight']`:

        loss = reduce( l_t(logp, old_logp, A)                   the registered policy loss
                       - ent_coef * H_t
                       + vf_coef * l^V_t(V, old_V, R)           (use_value)
                       + kl_loss_coef * k3_t(logp, ref_logp) )  (in-loss KL, as TRL's GRPO)

    Args:
      loss: a `registry.LOSSES` name.
      clip_eps: lower ratio clip (and the upper one unless clip_eps_high / the loss sets it).
      clip_eps_high: upper ratio clip (0 = the loss's default, see `registry.clip_range`).
      value_clip: value clip range (0 = unclipped value loss).
      vf_coef: weight of the value loss.
      ent_coef: weight of the entropy bonus.
      kl_loss_coef: weight of the KL-to-reference term in the loss.
      use_value: train a value head (critic estimators) or not.
      temperature: the rollouts' sampling temperature; the policy's logits are divided by it,
        as they were for the old log-probs (`rollout.teacher_forced`), so the first update's
        ratio is exactly 1.
      max_len: the response length limit N (the 'fixed_length' reducer divides by it).
      chunk: positions per chunk of the log-prob / entropy computation (no [B,T,V] logits).
    """
    spec = registry.resolve("ppo", loss_name=loss)[1]
    if spec.reduce == "fixed_length" and max_len <= 0:
        raise ValueError(f"loss {loss!r} divides by a fixed length: pass max_len > 0")
    clip_low, clip_high = registry.clip_range(spec, clip_eps, clip_eps_high)

    def loss_fn(model, batch, rng):
        del rng
        # Log-probs and entropy chunk by chunk: no [B,T,V] logits (losses.chunked_token_logprobs).
        logp, entropy_bn, values = rollout_lib.policy_outputs(
            model, batch["tokens"], batch["positions"], batch["segment_ids"], temperature,
            with_entropy=True, chunk=chunk,
        )  # fmt: skip
        mask = batch["loss_mask"].astype(jnp.float32)
        ctx = registry.ReduceContext(max_len, batch.get("rollout_mean_len"))
        extra_bn = -ent_coef * entropy_bn if ent_coef else jnp.zeros_like(logp)
        aux = {"entropy": adv_lib.masked_mean(entropy_bn, mask)}
        if use_value:
            v_bn, v_clip_bn = objectives.value_loss_per_token(
                values, batch["values"], batch["returns"], clip=value_clip
            )
            extra_bn = extra_bn + vf_coef * v_bn
            aux.update(
                value_loss=adv_lib.masked_mean(v_bn, mask),
                value_clip_frac=adv_lib.masked_mean(v_clip_bn, mask),
            )
        if kl_loss_coef:
            kl_bn = kl_lib.kl_k3(logp, batch["ref_logprobs"])
            extra_bn = extra_bn + kl_loss_coef * kl_bn
            aux["kl_loss"] = adv_lib.masked_mean(kl_bn, mask)
        pg, weight, clip_frac = registry.policy_loss(
            spec, logp, batch["old_logprobs"], batch["advantages"], mask, ctx,
            clip_low=clip_low, clip_high=clip_high,
        )  # fmt: skip
        # Reducers are linear: reducing the other terms apart is reducing the per-token sum.
        loss = pg + registry.reduce(spec, extra_bn, mask, ctx)[0]
        log_ratio = jax.lax.stop_gradient(logp - batch["old_logprobs"])
        aux.update(
            # The reducer's count (tokens, or sequences for per-sequence normalisations): grad
            # accumulation weighs each microbatch by it, so k microbatches = one big batch.
            loss_weight=weight,
            policy_loss=pg,
            clip_frac=clip_frac,
            approx_kl=adv_lib.masked_mean(jnp.exp(log_ratio) - 1.0 - log_ratio, mask),
        )
        return loss, aux

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Rollout -> learner batch
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("kl_estimator", "advantage", "settings"))
def _advantages(logp, ref, values, scores, m, kl_coef, *, kl_estimator, advantage, settings):
    """The numeric core of `prepare`, one compiled call (a rollout's shapes are fixed, so it
    compiles once): (advantages, returns, values, sequence KL), each masked to the response."""
    spec = registry.ADVANTAGES[advantage]
    values = values * m if spec.critic else jnp.zeros_like(m)
    # Critic estimators take the KL as a reward penalty; the others have it in the loss.
    kl_tok = kl_lib.kl_penalty(logp, ref, kl_estimator) * m
    rewards = adv_lib.terminal_rewards(scores, m) - (kl_coef * kl_tok if spec.critic else 0.0)
    x = registry.AdvantageInputs(scores, rewards, values, m)
    advantages, returns = spec.fn(x, settings)
    return advantages * m, returns * m, values, (kl_lib.kl_k1(logp, ref) * m).sum(1)


def prepare(
    ro: rollout_lib.Rollout,
    *,
    kl_coef: float,
    advantage: str = "gae",
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    group_size: int = 1,
) -> tuple[dict, dict]:
    """Rewards, advantages and returns of a rollout, as a `[B, T]` learner batch.

    PPO ('gae'):  r_t = s * [t last] - beta * kl_t;  (A, R) = GAE(r, V);  A whitened.
    Group estimators ('grpo', 'dr_grpo', 'rloo'): one advantage per sequence, on each of its
    tokens, from the G scores of its prompt; no values. See `fft.rl.registry`.

    Args:
      ro: the rollout.
      kl_coef: beta (the controller's current value); critic estimators only.
      advantage: a `registry.ADVANTAGES` name.
      kl_estimator: per-token KL estimator of the penalty ('k1' | 'k2' | 'k3').
      gamma, lam: GAE discount and lambda.
      whiten: whiten GAE advantages over the batch's response tokens.
      group_size: G, samples per prompt (rows of one prompt adjacent).

    Returns:
      (batch with the Batch fields + PPO_FIELDS + rollout_mean_len as numpy, scalar stats).
    """
    spec = registry.ADVANTAGES[advantage]
    if spec.group and group_size < 2:
        raise ValueError(f"advantage {advantage!r} compares samples: group_size must be >= 2")
    p = ro.prompt_len
    m = jnp.asarray(ro.batch["loss_mask"][:, p:], jnp.float32)
    logp, ref = jnp.asarray(ro.logp[:, p:]), jnp.asarray(ro.ref_logp[:, p:])
    settings = registry.AdvantageSettings(group_size=max(group_size, 1), gamma=gamma, lam=lam,
                                          whiten=whiten)  # fmt: skip
    advantages, returns, values, seq_kl = _advantages(
        logp,
        ref,
        jnp.asarray(ro.values[:, p:]),
        jnp.asarray(ro.scores, jnp.float32),
        m,
        jnp.float32(kl_coef),
        kl_estimator=kl_estimator,
        advantage=advantage,
        settings=settings,
    )

    def full(x_bn):  # [B, N] response view -> [B, P+N] token-aligned
        return np.pad(np.asarray(x_bn, np.float32), ((0, 0), (p, 0)))

    lengths = np.asarray(m).sum(1)
    batch = dict(ro.batch)
    batch.update(
        old_logprobs=np.asarray(ro.logp, np.float32) * ro.batch["loss_mask"],
        ref_logprobs=np.asarray(ro.ref_logp, np.float32) * ro.batch["loss_mask"],
        advantages=full(advantages),
        returns=full(returns),
        values=full(values),
        rollout_mean_len=np.full(len(lengths), lengths.mean(), np.float32),
    )
    seq_kl = np.asarray(seq_kl)
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
      minibatch_size: rows per optimizer step (config.batch_size), the global minibatch. Every
        process samples the same global rollout (generation is sharded over the mesh and its
        output gathered), computes the same advantages, and yields its `minibatch_size /
        process_count` rows of each minibatch: no row is trained twice, and 1 and N processes
        train on the same minibatches.
      epochs: passes over each rollout.
      controller: a KL controller (its value is beta).
      seed: seeds sampling and minibatch shuffling (with the iteration number).
      group_size: samples per prompt (group estimators need > 1).
      prepare_kwargs: passed to `prepare` (the advantage estimator among them).
      dynamic_sampling: DAPO's dynamic sampling: drop groups whose scores are all equal (zero
        advantage, no gradient) and refill the rollout from more prompts.
      max_sampling_rounds: at most this many prompt batches per rollout; if still short, the
        rollout is completed with dropped groups (the `filled_groups` metric counts them).
      overlong_buffer: DAPO's overlong shaping: a penalty over the last this many tokens before
        the length limit (0 = off; see `advantages.overlong_penalty`).
      overlong_penalty: the penalty at the limit.
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
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 4,
        overlong_buffer: int = 0,
        overlong_penalty: float = 1.0,
    ):
        self.prompts, self.collect_fn = prompts, collect_fn
        self.minibatch_size, self.epochs = int(minibatch_size), int(epochs)
        self.controller, self.seed = controller, int(seed)
        self.group_size = max(int(group_size), 1)
        self.prepare_kwargs = dict(prepare_kwargs or {})
        if dynamic_sampling and self.group_size < 2:
            raise ValueError("dynamic sampling drops groups of equal scores: needs group_size >= 2")
        self.dynamic_sampling, self.max_sampling_rounds = dynamic_sampling, int(max_sampling_rounds)
        self.overlong_buffer, self.overlong_penalty = int(overlong_buffer), float(overlong_penalty)
        self.rollout_batch = prompts.batch_size * self.group_size
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        rows_per_process(self.minibatch_size, self.process_count)  # the error when it does not
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

    def _shaped(self, ro: rollout_lib.Rollout) -> tuple[rollout_lib.Rollout, float]:
        """The rollout with overlong shaping added to its scores, and the mean penalty."""
        if not self.overlong_buffer:
            return ro, 0.0
        lengths = ro.batch["loss_mask"][:, ro.prompt_len :].sum(1)
        max_len = ro.batch["tokens"].shape[1] - ro.prompt_len
        pen = adv_lib.overlong_penalty(
            lengths, max_len, self.overlong_buffer, self.overlong_penalty
        )
        return dataclasses.replace(ro, scores=ro.scores + pen), float(np.mean(pen))

    def _sample(self) -> tuple[rollout_lib.Rollout, dict]:
        """One rollout of `rollout_batch` rows (dynamic sampling: of informative groups)."""
        key = jax.random.fold_in(jax.random.key(self.seed), self.iteration)
        g, n_groups = self.group_size, self.rollout_batch // self.group_size
        parts, keep, spare, stats = [], [], [], {}
        penalties, dropped, rounds = [], 0, 0
        while True:
            records = next(self.prompts)
            if g > 1:
                records = [r for r in records for _ in range(g)]
            # Round 0 keeps the plain run's key: turning the switch on changes nothing else.
            rng = key if rounds == 0 else jax.random.fold_in(key, rounds)
            ro, pen = self._shaped(self.collect_fn(self._policy(), records, rng))
            penalties.append(pen)
            rounds += 1
            if not self.dynamic_sampling:
                break
            offset = sum(len(p.records) for p in parts)
            parts.append(ro)
            informative = adv_lib.informative_groups(ro.scores, g)
            dropped += int((~informative).sum())
            keep += [offset + i * g for i in np.flatnonzero(informative)]
            spare += [offset + i * g for i in np.flatnonzero(~informative)]
            if len(keep) >= n_groups or rounds >= self.max_sampling_rounds:
                filled = max(n_groups - len(keep), 0)
                starts = (keep + spare)[:n_groups]
                rows = [s + j for s in starts for j in range(g)]
                ro = rollout_lib.take(rollout_lib.concat(parts), rows)
                stats = {
                    "dropped_groups": float(dropped),
                    "filled_groups": float(filled),
                    "sampling_rounds": float(rounds),
                }
                break
        if self.overlong_buffer:
            stats["overlong_penalty"] = float(np.mean(penalties))
        return ro, stats

    def _new_rollout(self) -> None:
        now = time.time()
        update_s = now - self._update_t0 if self._update_t0 is not None else 0.0
        ro, sampling_stats = self._sample()
        batch, stats = prepare(
            ro, kl_coef=self.controller.value, group_size=self.group_size, **self.prepare_kwargs
        )
        self.controller.update(stats["kl"], self.rollout_batch)
        stats.update(sampling_stats, update_s=update_s)
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
        # Every process holds the whole rollout; the minibatch is global, and this process
        # hands the loop its slice of it (fft.sharding.put_batch joins the slices).
        rows = len(idx) // self.process_count
        idx = idx[self.process_index * rows : (self.process_index + 1) * rows]
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
