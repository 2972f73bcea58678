"""Formats: loss masks on hand-built instruction / chat examples, templates, truncation."""

import pytest

from fft.data.formats import encode_prompt, encode_record
from fft.data.sources import BadRecordError


def _target_text(tok, ex, tokens="tokens", mask="loss_mask"):
    return tok.decode([t for t, m in zip(ex[tokens], ex[mask], strict=True) if m])


def test_text_all_targets_but_first(tokenizer):
    ex = encode_record({"text": "the cat sat"}, "text", tokenizer, max_len=64)
    assert ex["tokens"][0] == tokenizer.bos_id and ex["tokens"][-1] == tokenizer.eos_id
    assert ex["loss_mask"] == [0] + [1] * (len(ex["tokens"]) - 1)


def test_text_split_into_chunks(tokenizer):
    text = " ".join(["the cat sat on a mat"] * 20)
    chunks = encode_record({"text": text}, "text", tokenizer, max_len=16, truncation="split")
    assert all(len(c["tokens"]) <= 16 for c in chunks)
    assert sum(len(c["tokens"]) for c in chunks) == len(tokenizer.encode(text)) + 2


def test_instruction_default_template_mask(tokenizer):
    rec = {"instruction": "add one two", "input": "three", "output": "the answer"}
    ex = encode_record(rec, "instruction", tokenizer, max_len=128)
    full = tokenizer.decode(ex["tokens"])
    assert full == "### Instruction: add one two\n### Input: three\n### Response: the answer"
    # The space before the answer is the answer's (its first word keeps its word-start marker).
    assert _target_text(tokenizer, ex) == " the answer"
    assert ex["tokens"][-3:-1] == tokenizer.encode(" the answer")
    assert ex["tokens"][-1] == tokenizer.eos_id and ex["loss_mask"][-1] == 1
    # The prompt used for generation is exactly the unmasked prefix.
    prompt = encode_prompt(rec, "instruction", tokenizer)
    assert ex["tokens"][: len(prompt)] == prompt and not any(ex["loss_mask"][: len(prompt)])
    no_input = encode_record(
        {"instruction": "x", "output": "y"}, "instruction", tokenizer, max_len=64
    )
    assert "Input" not in tokenizer.decode(no_input["tokens"])


def test_instruction_custom_template_and_train_on_prompt(tokenizer):
    rec = {"instruction": "red {blue}", "output": "green"}
    tpl = "Q: {instruction}{input}\nA: {output} ."
    ex = encode_record(rec, "instruction", tokenizer, max_len=64, template=tpl)
    assert tokenizer.decode(ex["tokens"]) == "Q: red {blue}\nA: green ."
    assert _target_text(tokenizer, ex) == " green ."
    ex = encode_record(
        rec, "instruction", tokenizer, max_len=64, template=tpl, train_on_prompt=True
    )
    assert ex["loss_mask"] == [0] + [1] * (len(ex["tokens"]) - 1)


def test_missing_field_is_named(tokenizer):
    with pytest.raises(BadRecordError, match="'output'"):
        encode_record({"instruction": "x"}, "instruction", tokenizer, max_len=64)
    with pytest.raises(BadRecordError, match="'messages'"):
        encode_record({"text": "x"}, "chat", tokenizer, max_len=64)


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "one"},
    {"role": "assistant", "content": "two"},
    {"role": "user", "content": "three"},
    {"role": "assistant", "content": "four"},
]


def test_chat_default_format_every_assistant_turn(tokenizer):
    ex = encode_record({"messages": CHAT[:3]}, "chat", tokenizer, max_len=128)
    assert _target_text(tokenizer, ex) == " two"  # eos is a target too; decode drops it
    targets = [t for t, m in zip(ex["tokens"], ex["loss_mask"], strict=True) if m]
    assert targets[-1] == tokenizer.eos_id
    multi = encode_record({"messages": CHAT}, "chat", tokenizer, max_len=128)
    assert _target_text(tokenizer, multi) == " two four"
    assert (
        sum(
            1
            for t, m in zip(multi["tokens"], multi["loss_mask"], strict=True)
            if m and t == tokenizer.eos_id
        )
        == 2
    )
    # role markers are single user-defined tokens, never targets
    marker = tokenizer.piece_to_id("<|assistant|>")
    assert [m for t, m in zip(multi["tokens"], multi["loss_mask"], strict=True) if t == marker] == [
        0,
        0,
    ]
    prompt = encode_prompt({"messages": CHAT}, "chat", tokenizer)
    assert multi["tokens"][: len(prompt)] == prompt


JINJA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}[A] {{ m['content'] }}{{ eos_token }}"
    "{% else %}[{{ m['role'] }}] {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[A] {% endif %}"
)


def test_chat_jinja_template(tokenizer):
    ex = encode_record({"messages": CHAT}, "chat", tokenizer, max_len=128, template=JINJA)
    assert ex["tokens"][0] == tokenizer.bos_id  # '<s>' in the rendered text maps to the bos id
    eos_positions = [i for i, t in enumerate(ex["tokens"]) if t == tokenizer.eos_id]
    assert len(eos_positions) == 2 and all(ex["loss_mask"][i] for i in eos_positions)
    assert _target_text(tokenizer, ex) == " two four"
    assert (
        tokenizer.decode(ex["tokens"])
        == "[system] be brief\n[user] one\n[A] two[user] three\n[A] four"
    )
    # The tokenizer's own chat_template is used when no template is passed.
    tokenizer.chat_template = JINJA
    try:
        again = encode_record({"messages": CHAT}, "chat", tokenizer, max_len=128)
    finally:
        tokenizer.chat_template = None
    assert again == ex


def test_truncation_cuts_prompt_first_or_drops(tokenizer):
    rec = {"prompt": " ".join(["the cat sat"] * 30), "completion": "a dog"}
    full = encode_record(rec, "prompt_completion", tokenizer, max_len=1000)
    ex = encode_record(rec, "prompt_completion", tokenizer, max_len=12)
    assert ex["truncated"] and len(ex["tokens"]) == 12
    assert ex["tokens"][0] == tokenizer.bos_id
    assert ex["tokens"][-4:] == full["tokens"][-4:]  # the completion survives
    assert _target_text(tokenizer, ex) == "a dog"
    assert encode_record(rec, "prompt_completion", tokenizer, max_len=12, truncation="drop") is None
    long_chat = {"messages": [{"role": "user", "content": "red " * 40}] + CHAT[1:3]}
    ex = encode_record(long_chat, "chat", tokenizer, max_len=20)
    assert len(ex["tokens"]) == 20 and _target_text(tokenizer, ex) == " two"


def test_preference_ranking_classification(tokenizer):
    pref = encode_record(
        {"prompt": "one two", "chosen": "three", "rejected": "four"},
        "preference",
        tokenizer,
        max_len=32,
    )
    assert _target_text(tokenizer, pref, "chosen_tokens", "chosen_loss_mask") == "three"
    assert _target_text(tokenizer, pref, "rejected_tokens", "rejected_loss_mask") == "four"
    chat_prompt = [{"role": "user", "content": "one"}]
    pref = encode_record(
        {"prompt": chat_prompt, "chosen": "a", "rejected": "b"}, "preference", tokenizer, max_len=32
    )
    assert tokenizer.decode(pref["chosen_tokens"]) == "<|user|> one\n<|assistant|> a"
    rank = encode_record(
        {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
        "ranking",
        tokenizer,
        max_len=32,
    )
    assert len(rank["cand_tokens"]) == 3 and rank["ranks"] == [2, 0, 1]
    cls = encode_record(
        {"text": "red cat", "label": "pos"},
        "classification",
        tokenizer,
        max_len=32,
        label_names=["neg", "pos"],
    )
    assert cls["label"] == 1 and not any(cls["loss_mask"])
    multi = encode_record(
        {"text": "x", "labels": ["neg", "pos"]},
        "classification",
        tokenizer,
        max_len=32,
        label_names=["neg", "pos", "mid"],
    )
    assert multi["label"] == [1.0, 1.0, 0.0]
    with pytest.raises(BadRecordError, match="unknown label"):
        encode_record(
            {"text": "x", "label": "meh"},
            "classification",
            tokenizer,
            max_len=8,
            label_names=["neg", "pos"],
        )
