"""The rollout loop: prompts -> samples -> logprobs (policy, reference) -> values -> scores.

    records  = next(PromptStream)                       checkpointable, seeded order
    prompt   = left-padded to a fixed P (one compile)
    response = generate_tokens(policy, prompt)           KV-cache sampler, one compiled loop
    seq      = [prompt | response]  [B, P+N]             segment 0 on padding and after the stop
    logp, ref_logp, values = teacher_forced(policy, ref, seq)      one jitted function
    scores   = reward_fn(records, seq, texts)           reward model or judge, per sequence

Log-probs are recomputed teacher-forced rather than taken from the sampler: the learner's
`old_logprobs` must come from exactly the computation the loss differentiates, or the PPO ratio
starts away from 1 (the sampler's values are kept to check that they agree, `tests/rl`).

Alignment: everything `[B, T]` is indexed by the token it is about. `logp[b, t]` is
log pi(x_t | x_<t) read from the logits at t-1, `values[b, t]` the value head at t-1 (the state
in which x_t is chosen), and `loss_mask[b, t] = 1` on response tokens (the Batch convention).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft import sharding
from fft.data import formats
from fft.models import lora as lora_lib
from fft.rl import rewards as rewards_lib
from fft.sampling import generate_tokens
from fft.train import losses

# The attribute under which the policy carries its PPO value head (attached to the decoder, so
# the decoder's own param paths stay those of the base model and its weights load unchanged).
VALUE_HEAD = "value_head"


# ---------------------------------------------------------------------------------------------
# Prompt stream
# ---------------------------------------------------------------------------------------------


class PromptStream:
    """Endless seeded stream of prompt-record batches; `get_state`/`set_state` resume exactly.

    Each epoch visits every record once in an order drawn from (seed, epoch).
    """

    def __init__(self, records: Sequence[dict], batch_size: int, *, seed: int = 0, shuffle=True):
        if not records:
            raise ValueError("PromptStream: no prompt records")
        self.records, self.batch_size = list(records), int(batch_size)
        self.seed, self.shuffle = int(seed), shuffle
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.records)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        out = []
        while len(out) < self.batch_size:
            order = self._order(self.epoch)
            take = min(self.batch_size - len(out), len(order) - self.index)
            out += [self.records[i] for i in order[self.index : self.index + take]]
            self.index += take
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


# ---------------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------------


def encode_prompts(records, tokenizer, prompt_len: int, fmt: str = "instruction"):
    """Prompt ids as training saw them, left-padded (or cut from the left) to exactly P tokens.

    Returns:
      (tokens_bp int32, mask_bp int32).
    """
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else max(tokenizer.eos_id, 0)
    tokens = np.full((len(records), prompt_len), pad, np.int32)
    mask = np.zeros((len(records), prompt_len), np.int32)
    for i, rec in enumerate(records):
        ids = formats.encode_prompt(rec, fmt, tokenizer)[-prompt_len:]
        tokens[i, prompt_len - len(ids) :] = ids
        mask[i, prompt_len - len(ids) :] = 1
    return tokens, mask


def sequences(prompt_bp, prompt_mask_bp, response_bn, response_mask_bn) -> dict:
    """[prompt | response] as a Batch `[B, P+N]` (numpy).

    segment_ids = 1 on real tokens (0 on left padding and after the stop token), positions count
    real tokens from 0, loss_mask = 1 on response tokens.
    """
    p = prompt_bp.shape[1]
    seg = np.concatenate([prompt_mask_bp, response_mask_bn], axis=1).astype(np.int32)
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    loss_mask = seg.astype(np.float32)
    loss_mask[:, :p] = 0.0
    return {
        "tokens": np.concatenate([prompt_bp, response_bn], axis=1).astype(np.int32),
        "positions": positions,
        "segment_ids": seg,
        "loss_mask": loss_mask,
    }


def shift_right(x_bt):
    """out[:, t] = x[:, t-1], out[:, 0] = 0: per-position outputs re-indexed by the next token."""
    return jnp.pad(x_bt[:, :-1], ((0, 0), (1, 0)))


def policy_outputs(
    model, tokens, positions, segment_ids, temperature=1.0, *, with_entropy=False,
    chunk: int = losses.LOGPROB_CHUNK,
):  # fmt: skip
    """(logp [B,T], entropy [B,T] or None, values [B,T] or None) of a policy, token-aligned.

    The logits are divided by `temperature`: the policy an RL learner optimises is the
    distribution its rollouts were sampled from. They are computed `chunk` positions at a time
    (`losses.chunked_token_logprobs`), never as a whole [B,T,V] array.
    """
    hidden = model.hidden_states(tokens, positions, segment_ids)
    out = losses.chunked_token_logprobs(
        hidden, model.logits, tokens, chunk=chunk, temperature=temperature,
        with_entropy=with_entropy,
    )  # fmt: skip
    logp, entropy = out if with_entropy else (out, None)
    head = getattr(model, VALUE_HEAD, None)
    values = shift_right(head(hidden)) if head is not None else None
    return logp, entropy, values


def reference_logprobs(model, tokens, positions, segment_ids, temperature=1.0, *,
                       chunk: int = losses.LOGPROB_CHUNK):  # fmt: skip
    """log pi_ref(x_t | x_<t) `[B, T]` of a reference decoder (tempered, chunked)."""
    hidden = model.hidden_states(tokens, positions, segment_ids)
    return losses.chunked_token_logprobs(
        hidden, model.logits, tokens, chunk=chunk, temperature=temperature
    )


@nnx.jit
def teacher_forced(model, ref_model, batch, temperature=1.0):
    """Policy log-probs, reference log-probs and values of every token of `batch`, in one jit.

    Both policy and reference logits are divided by `temperature` (traced), as in TRL: sampled
    at temperature T, the rollout's old log-probs, the KL penalty and the PPO ratio all belong
    to the same tempered distributions.

    Args:
      model: the policy (a decoder, maybe with LoRA and a `value_head`).
      ref_model: the reference decoder, or None: then the reference is `model` with its LoRA
        adapters disabled (the same weights, no second copy).
      batch: tokens / positions / segment_ids `[B, T]`.

    Returns:
      (logp [B,T], ref_logp [B,T], values [B,T] (zeros without a value head)).
    """
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    logp, _, values = policy_outputs(model, *args, temperature=temperature)
    if ref_model is None:
        with lora_lib.disable_lora(model):
            ref_logp = reference_logprobs(model, *args, temperature=temperature)
    else:
        ref_logp = reference_logprobs(ref_model, *args, temperature=temperature)
    if values is None:
        values = jnp.zeros_like(logp)
    return logp, ref_logp, values


# ---------------------------------------------------------------------------------------------
# One rollout
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Rollout:
    """A batch of sampled sequences with everything the learner needs (numpy, `[B, T]` =
    `[B, P+N]` token-aligned unless noted)."""

    records: list[dict]
    texts: list[str]  # decoded responses (no stop token)
    batch: dict  # tokens, positions, segment_ids, loss_mask
    logp: np.ndarray  # policy log-probs (teacher-forced)
    ref_logp: np.ndarray  # reference log-probs
    values: np.ndarray  # value head (zeros without one)
    sample_logp: np.ndarray  # the sampler's own log-probs of the response tokens [B, N]
    scores: np.ndarray  # reward_fn [B]
    true_scores: np.ndarray | None  # judge [B] (metrics only), if a judge is known
    prompt_len: int
    seconds: float


def collect(
    policy: nnx.Module,
    ref_model: nnx.Module | None,
    records: Sequence[dict],
    *,
    tokenizer,
    prompt_len: int,
    max_new_tokens: int,
    rng: jax.Array,
    reward_fn: rewards_lib.RewardFn,
    true_reward_fn: rewards_lib.RewardFn | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    prompt_format: str = "instruction",
) -> Rollout:
    """Samples one response per record and scores it (see the module docstring).

    Args:
      policy: the current policy decoder.
      ref_model: reference decoder, or None for "policy with LoRA disabled".
      records: prompt records (repeat a record G times for G samples of one prompt).
      tokenizer: encodes prompts, decodes responses; its eos ends a response.
      prompt_len: P, prompts are left-padded / cut to it.
      max_new_tokens: N.
      rng: sampling key.
      reward_fn: the training reward (reward model or judge).
      true_reward_fn: the judge, for metrics (None: not reported).
      temperature, top_k, top_p: sampling settings. The learner's log-probs use the same
        temperature (on-policy at any T > 0); top-k / top-p cuts are not corrected for (keep
        0 / 1.0 for PPO).
      prompt_format: how records render as prompts (`fft.data.formats.encode_prompt`).

    Returns:
      A Rollout.
    """
    t0 = time.time()
    prompt_bp, prompt_mask_bp = encode_prompts(records, tokenizer, prompt_len, prompt_format)
    stops = (tokenizer.eos_id,) if tokenizer.eos_id >= 0 else ()
    out = generate_tokens(
        policy,
        prompt_bp,
        prompt_mask_bp,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stops,
        rng=rng,
    )
    # On a multi-process mesh the samples are sharded over every host: each host gathers the
    # whole rollout (rewards, advantages and whitening are over all of it), then reads its
    # slice of each minibatch (fft.rl.ppo.PPOBatches).
    response_bn, resp_mask_bn, sample_logp = sharding.to_host((out.tokens, out.mask, out.logprobs))
    batch = sequences(prompt_bp, prompt_mask_bp, response_bn, resp_mask_bn)
    logp, ref_logp, values = sharding.to_host(
        teacher_forced(
            policy,
            ref_model,
            sharding.put_like(batch, nnx.state(policy)),
            jnp.float32(temperature if temperature > 0 else 1.0),
        )
    )
    texts = rewards_lib.decode_responses(tokenizer, response_bn, resp_mask_bn, stops)
    scores = np.asarray(reward_fn(records, batch, texts), np.float32)
    true_scores = None
    if true_reward_fn is not None:
        true_scores = np.asarray(true_reward_fn(records, batch, texts), np.float32)
    return Rollout(
        records=list(records),
        texts=texts,
        batch=batch,
        logp=logp,
        ref_logp=ref_logp,
        values=values,
        sample_logp=sample_logp * resp_mask_bn,
        scores=scores,
        true_scores=true_scores,
        prompt_len=prompt_len,
        seconds=time.time() - t0,
    )


def take(ro: Rollout, rows) -> Rollout:
    """The rollout restricted to `rows` (in that order)."""
    rows = np.asarray(rows, np.int64)
    opt = None if ro.true_scores is None else ro.true_scores[rows]
    return dataclasses.replace(
        ro,
        records=[ro.records[i] for i in rows],
        texts=[ro.texts[i] for i in rows],
        batch={k: v[rows] for k, v in ro.batch.items()},
        logp=ro.logp[rows],
        ref_logp=ro.ref_logp[rows],
        values=ro.values[rows],
        sample_logp=ro.sample_logp[rows],
        scores=ro.scores[rows],
        true_scores=opt,
    )


def concat(rollouts: Sequence[Rollout]) -> Rollout:
    """Rollouts of one prompt length stacked row-wise (seconds add up)."""
    first = rollouts[0]
    if len(rollouts) == 1:
        return first
    arrays = ("logp", "ref_logp", "values", "sample_logp", "scores")

    def cat(xs):
        return np.concatenate(xs, axis=0)

    true = None if first.true_scores is None else cat([r.true_scores for r in rollouts])
    return dataclasses.replace(
        first,
        records=[x for r in rollouts for x in r.records],
        texts=[x for r in rollouts for x in r.texts],
        batch={k: cat([r.batch[k] for r in rollouts]) for k in first.batch},
        true_scores=true,
        seconds=sum(r.seconds for r in rollouts),
        **{a: cat([getattr(r, a) for r in rollouts]) for a in arrays},
    )
