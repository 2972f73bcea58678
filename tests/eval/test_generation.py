"""Generation exact match: scoring on known outputs, and the batched eval on a scripted model."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fft.data.formats import encode_prompt
from fft.eval import generation
from fft.models import presets
from fft.models.transformer import Transformer
from fft.sampling import generate_tokens, left_pad


class CharTokenizer:
    """One id per character; 1 = bos, 2 = eos, 0 = pad."""

    bos_id, eos_id, pad_id, chat_template, special_tokens = 1, 2, 0, None, {}
    vocab_size = 130

    def encode(self, text, *, add_bos=False, add_eos=False):
        return [1] * add_bos + [ord(c) for c in text] + [2] * add_eos

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 2)


class ScriptedModel(nnx.Module):
    """A fake decoder whose greedy continuation of every prompt is `answer` + eos.

    It predicts the next token from the cache slot alone: the token written at slot `start + k`
    is the k-th answer token (prompts fill slots 0..start-1), every later one eos.
    """

    def __init__(self, answer_ids, start: int):
        script = list(answer_ids) + [CharTokenizer.eos_id]
        self.script = nnx.Variable(jnp.asarray(script, jnp.int32))
        self.start = start

    def init_cache(self, batch_size, max_len):
        return {"index": jnp.zeros((), jnp.int32)}

    def decode(self, tokens, positions, cache, token_mask=None, last_only=False):
        script = self.script[...]
        # The query in slot q predicts the token for slot q + 1.
        slots = cache["index"] + jnp.arange(tokens.shape[1])[None, :]
        next_ids = script[jnp.clip(slots + 1 - self.start, 0, script.shape[0] - 1)]
        logits = jnp.where(jnp.arange(CharTokenizer.vocab_size) == next_ids[..., None], 10.0, 0.0)
        logits = logits[:, -1:] if last_only else logits
        return logits, {"index": cache["index"] + tokens.shape[1]}


def test_exact_match_scores_overall_and_per_group():
    preds = ["a b", " a  b\n", "x", "7", "8"]
    refs = ["a b", "a b", "y", "7", "9"]
    out = generation.exact_match(preds, refs, ["t1", "t1", "t1", "t2", None])
    assert out["exact_match"] == pytest.approx(3 / 5)
    assert out["exact_match/t1"] == pytest.approx(2 / 3)
    assert out["exact_match/t2"] == 1.0
    assert set(out) == {"exact_match", "exact_match/t1", "exact_match/t2"}
    with pytest.raises(ValueError):
        generation.exact_match(["a"], ["a", "b"])


def test_reference_answers_of_each_format():
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}
    assert generation.reference_answer(chat, "chat") == "r"
    assert (
        generation.reference_answer({"prompt": "p", "completion": "c"}, "prompt_completion") == "c"
    )
    assert generation.reference_answer({"instruction": "i", "output": "o"}, "instruction") == "o"


def test_eval_on_a_scripted_model_scores_known_answers():
    tok = CharTokenizer()
    records = [
        {"instruction": "Say it.", "input": "", "output": "cat", "task": "say"},
        {"instruction": "Say it again, longer.", "input": "x", "output": "cat", "task": "say"},
        {"instruction": "Other.", "input": "", "output": "dog", "task": "other"},
        {"instruction": "Other too.", "input": "yy", "output": " cat ", "task": "other"},
        {"instruction": "Say.", "input": "", "output": "ca", "task": "say"},
    ]
    # Every prompt is left-padded to the longest, so every answer starts at the same slot.
    longest = max(len(encode_prompt(r, "instruction", tok)) for r in records)
    model = ScriptedModel(tok.encode("cat"), start=longest)
    seen = []
    evaluate = generation.make_exact_match_eval(
        records, "instruction", tok, batch_size=2, on_predictions=seen.extend
    )
    out = evaluate(model)
    assert out == {
        "exact_match": pytest.approx(3 / 5),
        "exact_match/other": pytest.approx(1 / 2),
        "exact_match/say": pytest.approx(2 / 3),
    }
    assert [s["response"] for s in seen] == ["cat"] * 5  # stopped at eos, eos not included
    assert [s["correct"] for s in seen] == [True, True, False, True, False]


def test_batched_eval_matches_one_prompt_at_a_time():
    tok = CharTokenizer()
    cfg = presets.get_preset("micro").replace(vocab_size=tok.vocab_size)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    records = [
        {"instruction": "ab" * (i + 1), "output": "zz", "task": f"t{i % 2}"} for i in range(5)
    ]
    seen = {}
    for bs in (2, 5):
        seen[bs] = []
        generation.make_exact_match_eval(
            records,
            "instruction",
            tok,
            batch_size=bs,
            max_new_tokens=6,
            on_predictions=seen[bs].extend,
        )(model)
    assert [s["response"] for s in seen[2]] == [s["response"] for s in seen[5]]
    # A single unpadded prompt gives the same greedy answer as the padded batch.
    ids = encode_prompt(records[0], "instruction", tok)
    t, m = left_pad([ids], tok.pad_id)
    out = generate_tokens(model, t, m, max_new_tokens=6, stop_tokens=(tok.eos_id,))
    row = [int(x) for x in np.asarray(out.tokens)[0][: int(out.lengths[0])]]
    assert tok.decode([x for x in row if x != tok.eos_id]) == seen[5][0]["response"]
