"""The rollout loop: sampler log-probs equal teacher-forced log-probs; reference via LoRA-off;
the prompt stream and the PPO data source resume exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fft.models import lora as lora_lib
from fft.models.heads import ValueHead
from fft.models.presets import get_preset
from fft.models.transformer import Transformer
from fft.rl import kl as kl_lib
from fft.rl import ppo, rollout


class CharTokenizer:
    """Bytes of the text, shifted past the specials (pad 0, eos 1, bos 2)."""

    pad_id, eos_id, bos_id, vocab_size, chat_template = 0, 1, 2, 512, None

    def encode(self, text, *, add_bos=False, add_eos=False):
        return [self.bos_id] * add_bos + [3 + b for b in text.encode()] + [self.eos_id] * add_eos

    def decode(self, ids):
        return bytes(max(i - 3, 0) % 256 for i in ids if i >= 3).decode(errors="replace")


RECORDS = [
    {"instruction": "Reverse the words.", "input": "a b c" * (i % 3 + 1), "output": "c b a"}
    for i in range(8)
]


def _policy(lora: bool, value_head: bool = True, seed: int = 0):
    cfg = get_preset("micro").replace(max_seq_len=256)
    rngs = nnx.Rngs(seed)
    model = Transformer(cfg, rngs=rngs)
    if lora:
        lora_lib.apply_lora(model, rank=4, alpha=8.0, rngs=rngs)
    if value_head:
        model.value_head = ValueHead(cfg.d_model, rngs=rngs)
    return model


def _collect(model, ref=None, records=RECORDS, key=0):
    return rollout.collect(
        model,
        ref,
        records,
        tokenizer=CharTokenizer(),
        prompt_len=64,
        max_new_tokens=8,
        rng=jax.random.key(key),
        reward_fn=lambda r, s, t: np.array([len(x) for x in t], float),
    )


def _perturb_lora(model, scale=0.5):
    for _, lin in lora_lib.lora_modules(model, ".*"):
        if hasattr(lin, "lora_b"):
            b = lin.lora_b[...]
            lin.lora_b[...] = scale * jax.random.normal(jax.random.key(1), b.shape, b.dtype)


def test_sampler_logprobs_equal_teacher_forced():
    model = _policy(lora=True)
    _perturb_lora(model)
    ro = _collect(model)
    p = ro.prompt_len
    m = ro.batch["loss_mask"][:, p:]
    assert m.sum() > 0
    np.testing.assert_allclose(ro.sample_logp, ro.logp[:, p:] * m, atol=2e-4)
    # The mask is 1 exactly on response tokens; logp is 0 at the first position.
    assert (ro.batch["loss_mask"][:, :p] == 0).all()
    assert ro.scores.shape == (len(RECORDS),)


def test_reference_is_policy_without_adapters():
    model = _policy(lora=True)
    ro = _collect(model)  # lora_b = 0: the policy equals its reference
    np.testing.assert_allclose(ro.logp, ro.ref_logp, atol=1e-5)
    _perturb_lora(model)
    ro = _collect(model)
    m = ro.batch["loss_mask"]
    assert np.abs((ro.logp - ro.ref_logp) * m).max() > 1e-3
    # ... and the reference equals the same weights with the adapters merged away (base only).
    base = _policy(lora=False, value_head=False)
    weights = nnx.filter_state(nnx.state(model), nnx.Param)
    nnx.update(
        base,
        weights.filter(
            lambda path, v: not isinstance(v, lora_lib.LoRAParam) and path[0] != "value_head"
        ),
    )
    batch = {k: jnp.asarray(v) for k, v in ro.batch.items()}
    _, ref_logp, _ = rollout.teacher_forced(base, base, batch)
    np.testing.assert_allclose(ro.ref_logp * m, np.asarray(ref_logp) * m, atol=1e-5)


def test_prompt_stream_resumes():
    s = rollout.PromptStream(list(range(5)), 3, seed=1)
    first = [next(s) for _ in range(2)]
    state = s.get_state()
    rest = [next(s) for _ in range(3)]
    t = rollout.PromptStream(list(range(5)), 3, seed=1)
    t.set_state(state)
    assert [next(t) for _ in range(3)] == rest
    assert sorted(first[0] + first[1][:2]) == [0, 1, 2, 3, 4]  # one epoch covers every record


def test_prepare_ppo_and_grpo_shapes():
    model = _policy(lora=False)
    ro = _collect(model, ref=_policy(lora=False, value_head=False, seed=1))
    batch, stats = ppo.prepare(ro, kl_coef=0.1)
    t = ro.batch["tokens"].shape[1]
    for k in ppo.PPO_FIELDS:
        assert batch[k].shape == (len(RECORDS), t) and batch[k].dtype == np.float32
        assert (batch[k] * (1 - ro.batch["loss_mask"]) == 0).all()  # nothing off the response
    seq_kl = (np.asarray(kl_lib.kl_k1(ro.logp, ro.ref_logp)) * ro.batch["loss_mask"]).sum(1)
    np.testing.assert_allclose(stats["kl"], seq_kl.mean(), rtol=1e-5)
    batch, _ = ppo.prepare(ro, kl_coef=0.1, advantage="grpo", group_size=4)
    adv = batch["advantages"]
    m = ro.batch["loss_mask"]
    # GRPO: one advantage per sequence, on every response token; groups of 4 sum to ~0.
    per_seq = adv.sum(1) / m.sum(1)
    np.testing.assert_allclose(per_seq.reshape(2, 4).sum(1), 0.0, atol=1e-4)


def test_ppo_batches_resume_identically():
    model = _policy(lora=True)
    graphdef, params, frozen = nnx.split(model, lora_lib.LoRAParam, ...)

    class S:  # the two fields PPOBatches reads from a TrainState
        pass

    state = S()
    state.params, state.frozen = params, frozen

    def make():
        stream = rollout.PromptStream(RECORDS, 4, seed=0)
        return ppo.PPOBatches(
            stream,
            lambda pol, rec, rng: _collect(pol, None, rec),
            minibatch_size=2,
            epochs=2,
            controller=kl_lib.make_controller("adaptive", 0.1, 1.0, 10),
        )

    a = make()
    out = []
    for _ in range(3):
        a.bind_state(graphdef, state)
        out.append(next(a))
    saved = a.get_state()
    assert saved["buffer"] is not None  # mid-rollout: 3 of 4 minibatches served
    a.bind_state(graphdef, state)
    want = next(a)
    b = make()
    b.set_state(saved)
    b.bind_state(graphdef, state)
    got = next(b)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])
    assert b.controller.value == a.controller.value != 0.1
    with pytest.raises(RuntimeError):
        _pull(make())  # no state bound and no loop frame to read it from


def _pull(it):
    return next(it)


def test_tempered_rollout_is_on_policy():
    """At temperature T the learner's old log-probs, the reference's and the loss all use the
    tempered distribution the tokens were sampled from; the first update's ratio is exactly 1."""
    t = 0.5
    model = _policy(lora=True)
    _perturb_lora(model)
    ro = rollout.collect(
        model, None, RECORDS, tokenizer=CharTokenizer(), prompt_len=64, max_new_tokens=8,
        rng=jax.random.key(0), reward_fn=lambda r, s, x: np.zeros(len(x)), temperature=t,
    )  # fmt: skip
    p, b = ro.prompt_len, ro.batch
    m = b["loss_mask"][:, p:]
    args = (jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"]))
    logits = np.asarray(model(*args), np.float64)
    want = np.take_along_axis(
        jax.nn.log_softmax(logits[:, :-1] / t, -1), b["tokens"][:, 1:, None], -1
    )[..., 0]
    np.testing.assert_allclose(ro.logp[:, p:] * m, want[:, p - 1 :] * m, atol=2e-4)
    np.testing.assert_allclose(ro.sample_logp, ro.logp[:, p:] * m, atol=2e-4)
    with lora_lib.disable_lora(model):
        ref_logits = np.asarray(model(*args), np.float64)
    want_ref = np.take_along_axis(
        jax.nn.log_softmax(ref_logits[:, :-1] / t, -1), b["tokens"][:, 1:, None], -1
    )[..., 0]
    np.testing.assert_allclose(ro.ref_logp[:, p:] * m, want_ref[:, p - 1 :] * m, atol=2e-4)

    batch = {k: jnp.asarray(v) for k, v in b.items()}
    batch.update(
        old_logprobs=jnp.asarray(ro.logp),
        advantages=jnp.ones_like(batch["loss_mask"], jnp.float32),
    )
    _, aux = ppo.make_loss_fn(use_value=False, temperature=t)(model, batch, None)
    assert float(aux["approx_kl"]) < 1e-6 and float(aux["clip_frac"]) == 0.0
