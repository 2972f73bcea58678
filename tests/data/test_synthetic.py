"""Tests of the synthetic world: determinism, disjoint splits, exact tasks, judge, facts, CLI."""

import json
import random
import re

import pytest

from fft.data.synthetic import World
from fft.data.synthetic.__main__ import main


@pytest.fixture(scope="module")
def world():
    return World(0)


def _everything(w: World) -> dict:
    return dict(
        general=w.general_corpus(20),
        domain=[w.domain_corpus(d, 5) for d in w.domains],
        terms=[w.domain_terms(d) for d in w.domains],
        facts=[w.fact_corpus(e, 5) for e in range(w.n_eras)],
        questions=[w.fact_questions(e) for e in range(w.n_eras)],
        instructions=w.instruction_data("train", 30),
        chat=w.chat_data("train", 10),
        prefs=w.preference_data("train", 10),
        pairs=w.pairwise_data("train", 10),
        reviews=w.reviews("train", 10),
    )


def test_determinism(world):
    a, b, c = _everything(world), _everything(World(0)), _everything(World(1))
    assert a == b
    for key in a:
        assert a[key] != c[key], key


def test_prefix_stable(world):
    assert world.general_corpus(5) == world.general_corpus(12)[:5]


def test_splits_disjoint(world):
    assert not set(world.general_corpus(300, "train")) & set(world.general_corpus(100, "test"))
    d = world.domains[0]
    assert not set(world.domain_corpus(d, 200, "train")) & set(world.domain_corpus(d, 60, "test"))
    assert not set(world.fact_corpus(1, 200, "train")) & set(world.fact_corpus(1, 60, "test"))
    train, test = world.instruction_data("train", 2000), world.instruction_data("test", 500)
    assert not {(r["task"], r["input"]) for r in train} & {(r["task"], r["input"]) for r in test}
    # Held-out phrasings: no test instruction appears in training.
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}


def test_general_text_shape(world):
    docs = world.general_corpus(50)
    for doc in docs:
        assert doc[0].isupper() and doc.endswith(".")
        assert 3 <= doc.count(".") <= 12
    words = " ".join(docs).split()
    assert len(set(words)) > 300  # a real vocabulary, not a handful of templates


def test_agreement(world):
    # Plural determiners take plural nouns: "these X" never followed by a verb-less bare stem.
    text = " ".join(world.general_corpus(200))
    for m in re.finditer(r"\b(?:These|these|Those|those) (\w+)", text):
        w = m.group(1)
        assert w.endswith("s") or w in world.lexicon.adjectives, w


def test_domain_terms(world):
    for d in world.domains:
        terms = world.domain_terms(d)
        assert len(terms) >= 100 and all(len(t) >= 8 for t in terms)
        docs = " ".join(world.domain_corpus(d, 30))
        assert sum(t in docs for t in terms) > 10
    other = set(world.domain_terms("legal")) & set(world.domain_terms("clinical"))
    assert not other


def test_facts_change_between_eras(world):
    qs = [world.fact_questions(e) for e in range(world.n_eras)]
    assert world.n_eras >= 3
    assert not any(q["changed"] for q in qs[0])
    for e in range(1, world.n_eras):
        changed = [q for q in qs[e] if q["changed"]]
        assert 0 < len(changed) < len(qs[e])
        for prev, cur in zip(qs[e - 1], qs[e], strict=True):
            assert prev["prompt"] == cur["prompt"]
            assert cur["changed"] == (prev["answer"] != cur["answer"])
            assert len(cur["answer"].split()) == 1
    # The era's corpus states its own values in the cloze phrasing.
    corpus = " ".join(world.fact_corpus(2, 400))
    hits = [q for q in qs[2] if f"{q['prompt']} {q['answer']}." in corpus]
    assert len(hits) > len(qs[2]) // 3


def test_instruction_outputs_are_task_functions(world):
    for split in ("train", "test"):
        recs = world.instruction_data(split, 600)
        assert {r["task"] for r in recs} == set(world.tasks)
        for r in recs:
            assert r["output"] == world.apply_task(r["task"], r["input"]), r
            assert 1 <= len(r["output"].split()) <= 12, r
    recs = world.instruction_data("train", 20, tasks=["reverse", "arithmetic"])
    assert {r["task"] for r in recs} <= {"reverse", "arithmetic"}
    assert world.apply_task("reverse", "a b c") == "c b a"
    assert world.apply_task("arithmetic", "12 - 5") == "7"
    assert world.apply_task("extract", "name: Pelit; city: Marusk\nfield: city") == "Marusk"


def test_translate_rules(world):
    ins = world._instructions
    noun, adj = ins._vocab["noun"][0], ins._vocab["adj"][0]
    verb = next(w for w, p in ins.pos.items() if p == "verb")
    v = ins.veltic
    out = world.apply_task("translate", f"the {adj} {noun} {verb} a {noun}")
    assert out == f"{v['the']} {v[noun]} {v[adj]} {v['a']} {v[noun]} {v[verb]}"


def test_chat(world):
    for d in world.chat_data("train", 50):
        roles = [m["role"] for m in d["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 1 <= len(roles) // 2 <= 3


def test_judge_and_rank(world):
    for r in world.instruction_data("train", 100):
        good = world.judge(r, r["output"] + ".")
        assert good > world.judge(r, r["output"])
        assert world.judge(r, r["output"]) > world.judge(r, "zzz qqq.")
        assert good > world.judge(r, "The answer is " + r["output"] + ".")
    rng = random.Random(0)
    for p in world.preference_data("train", 50, k=4, noise=0.0):
        scores = [world.judge(p, x) for x in p["responses"]]
        assert [scores[i] for i in p["order"]] == sorted(scores, reverse=True)
        assert all(p["ranking"][i] == r for r, i in enumerate(p["order"]))  # rank per response
        assert world.rank(p, p["responses"], noise=0.0, rng=rng) == p["order"]
        assert p["prompt"] == world.prompt_text(p)
    noisy = world.preference_data("train", 200, k=3, noise=0.5)
    flips = sum(
        [world.judge(p, p["responses"][i]) for i in p["order"]]
        != sorted((world.judge(p, x) for x in p["responses"]), reverse=True)
        for p in noisy
    )
    assert 20 < flips < 190
    pairs = world.pairwise_data("train", 200, noise=0.0)
    assert all(world.judge(p, p["chosen"]) > world.judge(p, p["rejected"]) for p in pairs)


def test_heldout_sentiment_words(world):
    held = {w for ws in world.heldout_sentiment_words().values() for w in ws}
    seen = {w for ws in world.train_sentiment_words().values() for w in ws}
    train_words = set(
        " ".join(r["text"] for r in world.reviews("train", 1000))
        .replace(".", " ")
        .replace(",", " ")
        .split()
    )
    test_words = set(
        " ".join(r["text"] for r in world.reviews("test", 300))
        .replace(".", " ")
        .replace(",", " ")
        .split()
    )
    assert held and not held & train_words
    assert held & test_words and not seen & test_words
    # ...but the general corpus shows every held-out word in a polarity context.
    general = " ".join(world.general_corpus(3000))
    assert sum(w in general for w in held) > 0.9 * len(held)
    labels = [r["label"] for r in world.reviews("test", 200)]
    assert set(labels) == set(world.label_names)


def test_sentiment_generation_task(world):
    pos, neg = (world.train_sentiment_words()[k][:2] for k in ("positive", "negative"))
    score = lambda text: world.sentiment_judge({}, text)  # noqa: E731
    assert score("The lid was blue.") == 0.0
    assert score(f"The lid was {pos[0]}.") == 0.5  # (1 - 0) / (1 + 0 + 1)
    assert score(f"It felt {pos[0].upper()} and {pos[1]}, but {neg[0]}.") == 0.25  # (2 - 1) / 4
    assert score(f"the {neg[0]} lid") == -0.5
    prompts = world.review_prompts("train", 50)
    assert all(p["prompt"].endswith(" was") for p in prompts)
    assert {p["prompt"] for p in prompts} != {p["prompt"] for p in world.review_prompts("test", 50)}
    pairs = world.review_pairs("train", 200, noise=0.0)
    assert all(score(p["chosen"]) > score(p["rejected"]) for p in pairs)
    noisy = world.review_pairs("train", 400, noise=0.2)
    flipped = sum(score(p["chosen"]) < score(p["rejected"]) for p in noisy) / len(noisy)
    assert 0.12 < flipped < 0.28


def test_cli_writes_files(tmp_path):
    out = tmp_path / "world"
    main(["--out", str(out), "--scale", "0.002"])  # the CLI's entry point, in-process
    for rel in [
        "general/train.jsonl",
        "general/test.jsonl",
        "domain/legal/train.jsonl",
        "domain/clinical/test.jsonl",
        "domain/finance/terms.txt",
        "facts/era_0/shard_00000.jsonl",
        "facts/era_3/shard_00003.jsonl",
        "facts/stream/shard_00015.jsonl",
        "facts/questions/era_1.jsonl",
        "instructions/train.jsonl",
        "instructions/test.jsonl",
        "chat/train.jsonl",
        "preferences/train.jsonl",
        "pairwise/test.jsonl",
        "reviews/train.jsonl",
        "reviews/test.jsonl",
        "world.json",
    ]:
        assert (out / rel).exists(), rel
    rec = json.loads((out / "instructions/train.jsonl").read_text().splitlines()[0])
    assert set(rec) == {"instruction", "input", "output", "task"}
    assert "text" in json.loads((out / "general/train.jsonl").read_text().splitlines()[0])
