"""DAPO's sampling side: dynamic sampling (drop groups of equal rewards, refill, count) and
overlong reward shaping, on hand-made rollouts (no model)."""

import numpy as np
import pytest

from fft.rl import advantages as adv_lib
from fft.rl import kl as kl_lib
from fft.rl import ppo, rollout

P, N, G = 2, 4, 2


def test_informative_groups():
    s = np.array([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 1e-3])
    np.testing.assert_array_equal(adv_lib.informative_groups(s, 2), [False, True, False, True])


def test_overlong_penalty():
    # N = 10, buffer 4: no penalty up to 6 tokens, then -1/4 per token, -1 at the limit.
    lengths = np.array([3, 6, 7, 8, 10])
    np.testing.assert_allclose(adv_lib.overlong_penalty(lengths, 10, 4), [0, 0, -0.25, -0.5, -1])
    np.testing.assert_allclose(adv_lib.overlong_penalty(lengths, 10, 4, 0.5)[-1], -0.5)
    np.testing.assert_allclose(adv_lib.overlong_penalty(lengths, 10, 0), np.zeros(5))


def _fake_collect(policy, records, rng):
    """A rollout without a model: sample k of a prompt scores record['scores'][k] and is
    record['length'] tokens long."""
    del policy, rng
    b = len(records)
    lengths = np.array([r["length"] for r in records])
    resp_mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
    prompt = np.ones((b, P), np.int32)
    batch = rollout.sequences(prompt, np.ones((b, P), np.int32), 3 + resp_mask, resp_mask)
    scores = np.array([r["scores"][i % G] for i, r in enumerate(records)], np.float32)
    zeros = np.zeros((b, P + N), np.float32)
    return rollout.Rollout(
        records=list(records), texts=[r["name"] for r in records], batch=batch, logp=zeros,
        ref_logp=zeros, values=zeros, sample_logp=np.zeros((b, N), np.float32), scores=scores,
        true_scores=scores, prompt_len=P, seconds=0.0,
    )  # fmt: skip


def _rec(name, scores, length=2):
    return {"name": name, "scores": scores, "length": length}


# Prompt order (no shuffle), 2 prompts per round: [U0, I1], [U2, U3], [I4, I5].
RECORDS = [_rec("U0", (1, 1)), _rec("I1", (0, 1)), _rec("U2", (0, 0)), _rec("U3", (1, 1)),
           _rec("I4", (1, 0)), _rec("I5", (0, 1))]  # fmt: skip


def _batches(**kw):
    b = ppo.PPOBatches(
        rollout.PromptStream(RECORDS, 2, shuffle=False), _fake_collect, minibatch_size=4,
        epochs=1, controller=kl_lib.make_controller("fixed", 0.0, 1.0, 1), group_size=G,
        prepare_kwargs={"advantage": "grpo"}, **kw,
    )  # fmt: skip
    b._policy = lambda: None  # the fake collector needs no weights
    return b


def test_dynamic_sampling_drops_uniform_groups_and_refills():
    b = _batches(dynamic_sampling=True, max_sampling_rounds=4)
    batch = next(b)
    # Kept: I1 (round 1) and I4 (round 3, the first of the two needed); dropped U0, U2, U3.
    assert b.stats["dropped_groups"] == 3 and b.stats["filled_groups"] == 0
    assert b.stats["sampling_rounds"] == 3
    adv = batch["advantages"][:, P:].sum(1) / batch["loss_mask"][:, P:].sum(1)
    # I1 scores (0, 1) -> (-1, 1); I4 scores (1, 0) -> (1, -1); every row informative.
    np.testing.assert_allclose(np.sort(adv), [-1, -1, 1, 1], atol=1e-4)
    assert b.stats["reward"] == 0.5


def test_dynamic_sampling_fills_when_out_of_rounds():
    b = _batches(dynamic_sampling=True, max_sampling_rounds=2)
    next(b)
    # After 2 rounds only I1 is informative: one group is filled back from the dropped ones.
    assert b.stats["dropped_groups"] == 3 and b.stats["filled_groups"] == 1
    assert b.stats["sampling_rounds"] == 2


def test_dynamic_sampling_off_keeps_the_batch():
    b = _batches()
    batch = next(b)
    assert "dropped_groups" not in b.stats
    adv = batch["advantages"][:, P:].sum(1)
    assert (np.abs(adv) < 1e-4).sum() == 2  # U0's two rows have zero advantage


def test_dynamic_sampling_needs_groups():
    with pytest.raises(ValueError, match="group_size"):
        ppo.PPOBatches(
            rollout.PromptStream(RECORDS, 2), _fake_collect, minibatch_size=2, epochs=1,
            controller=kl_lib.make_controller("fixed", 0.0, 1.0, 1), dynamic_sampling=True,
        )  # fmt: skip


def test_overlong_shaping_changes_the_scores():
    recs = [_rec("a", (1, 1), length=4), _rec("b", (1, 1), length=2)]
    b = ppo.PPOBatches(
        rollout.PromptStream(recs, 2, shuffle=False), _fake_collect, minibatch_size=4, epochs=1,
        controller=kl_lib.make_controller("fixed", 0.0, 1.0, 1), group_size=G,
        prepare_kwargs={"advantage": "dr_grpo"}, overlong_buffer=2,
    )  # fmt: skip
    b._policy = lambda: None
    next(b)
    # N = 4, buffer 2: 4 tokens -> -1, 2 tokens -> 0; rewards 1 -> 0 and 1.
    assert b.stats["overlong_penalty"] == -0.5
    assert b.stats["reward"] == 0.5
