"""Pipelines: exact resume, mixtures, streaming shards, bad records, per-host shards, eval."""

import json
import threading
import time

import numpy as np
import pytest

from fft.config_lib import FFTError
from fft.data.batch import validate_batch
from fft.data.pipeline import make_encoder, make_eval_batches, make_train_iterator
from fft.data.sources import BadRecordError, ShardStream


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("packing", [True, False])
def test_resume_gives_identical_batches(tokenizer, jsonl, make_corpus, packing):
    # Few records and long texts: 10 batches cross epochs and split records into chunks.
    texts = make_corpus(60, seed=3)
    path = jsonl("train.jsonl", [{"text": " ".join(texts[i : i + 3])} for i in range(0, 60, 2)])
    encode = make_encoder("text", tokenizer, max_len=24, truncation="split")
    kw = dict(seq_len=24, batch_size=3, packing=packing, seed=7, shard_index=0, shard_count=1)
    reference = _take(make_train_iterator(path, encode, **kw), 10)
    for b in reference:
        validate_batch(b)
    it = make_train_iterator(path, encode, **kw)
    first = _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    resumed = make_train_iterator(path, encode, **kw)
    resumed.set_state(state)
    _assert_same(first + _take(resumed, 5), reference)
    # Continuing the original iterator agrees too (get_state does not disturb it), and the
    # counters agree once both have read the same records.
    _assert_same(_take(it, 5), reference[5:])
    assert resumed.stats == it.stats
    assert it.stats["examples"] > it.stats["records"]  # long texts were split


def _tagged(tmp_path, name, n, tag):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"src": tag, "i": i}) + "\n" for i in range(n)))
    return str(path)


def _by_source(r):
    return {"tokens": [r["src"], r["src"], r["i"] + 10], "loss_mask": [0, 1, 1]}


def _source_counts(batches):
    first = np.concatenate([b["tokens"][:, 0] for b in batches])
    return np.bincount(first, minlength=3)[1:]


def test_mixture_weights_and_change_on_resume(tmp_path):
    a, b = _tagged(tmp_path, "a.jsonl", 50, 1), _tagged(tmp_path, "b.jsonl", 13, 2)
    kw = dict(seq_len=4, batch_size=8, packing=False, shard_index=0, shard_count=1)
    it = make_train_iterator([a, b], _by_source, weights=[0.8, 0.2], **kw)
    counts = _source_counts(_take(it, 50))
    assert abs(counts[0] / counts.sum() - 0.8) < 0.02
    state = it.get_state()
    # Resume with new weights: the shares follow the new weights from the resume point.
    it2 = make_train_iterator([a, b], _by_source, weights=[0.3, 0.7], **kw)
    it2.set_state(state)
    counts = _source_counts(_take(it2, 50))
    assert abs(counts[0] / counts.sum() - 0.3) < 0.02


def test_finite_epochs_and_host_shards(tmp_path):
    a = _tagged(tmp_path, "a.jsonl", 21, 1)
    kw = dict(seq_len=4, batch_size=3, packing=False, num_epochs=2)

    def ids(it):
        return [[int(t) - 10 for t in b["tokens"][:, 2]] for b in it]

    one = ids(make_train_iterator(a, _by_source, shard_index=0, shard_count=1, **kw))
    assert len(one) == 14  # two epochs of 7 global batches of 3
    first, second = sum(one[:7], []), sum(one[7:], [])
    assert sorted(first) == sorted(second) == list(range(21))  # each epoch reads all once
    assert first != second  # reshuffled each epoch
    # batch_size is global: 3 hosts read one row each, and the global batch at every step
    # (the hosts' rows in host order) is the one a single host reads.
    hosts = [
        ids(make_train_iterator(a, _by_source, shard_index=h, shard_count=3, **kw))
        for h in range(3)
    ]
    assert [sum((hosts[h][s] for h in range(3)), []) for s in range(14)] == one
    with pytest.raises(FFTError, match="global batch"):
        make_train_iterator(a, _by_source, shard_index=0, shard_count=2, **kw)


def test_bad_records_error_or_counted(tokenizer, jsonl):
    path = jsonl(
        "d.jsonl", [{"text": "the cat"}, "{broken", {"txt": "no text field"}, {"text": "a dog"}]
    )
    encode = make_encoder("text", tokenizer, max_len=16)
    kw = dict(seq_len=16, batch_size=1, packing=False, shuffle=False, shard_index=0, shard_count=1)
    it = make_train_iterator(path, encode, **kw)
    next(it)
    with pytest.raises(BadRecordError, match=f"{path}:2"):
        next(it)
    it = make_train_iterator(path, encode, on_bad_record="skip", num_epochs=1, **kw)
    assert len(list(it)) == 2
    assert it.stats["skipped_records"] == 2
    missing = jsonl("e.jsonl", [{"text": "ok"}, {"txt": 1}])
    with pytest.raises(BadRecordError, match=rf"{missing}:2: .*missing field 'text'"):
        list(make_train_iterator(missing, encode, **kw))


def test_dropped_and_truncated_counted(tokenizer, jsonl):
    long = " ".join(["the cat sat"] * 30)
    path = jsonl(
        "p.jsonl", [{"prompt": long, "completion": "a"}, {"prompt": "b", "completion": "c"}]
    )
    for truncation, key in (("prompt", "truncated"), ("drop", "dropped_too_long")):
        encode = make_encoder("prompt_completion", tokenizer, max_len=16, truncation=truncation)
        it = make_train_iterator(
            path, encode, seq_len=16, batch_size=1, num_epochs=1, shard_index=0, shard_count=1
        )
        list(it)
        assert it.stats[key] == 1


def test_stream_consumes_shard_added_while_iterating(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    _tagged(d, "000.jsonl", 4, 1)
    stream = ShardStream(str(d), poll_interval_s=0.01, stop_at_end=False, timeout_s=5)
    it = make_train_iterator(
        stream, _by_source, seq_len=4, batch_size=2, packing=False, shard_index=0, shard_count=1
    )
    assert [int(t) for t in next(it)["tokens"][:, 2]] == [10, 11]

    def add_shard():
        time.sleep(0.2)
        (d / "001.jsonl.tmp").write_text(
            "".join(json.dumps({"src": 2, "i": i}) + "\n" for i in (7, 8))
        )
        (d / "001.jsonl.tmp").rename(d / "001.jsonl")

    threading.Thread(target=add_shard).start()
    assert [int(t) for t in next(it)["tokens"][:, 2]] == [12, 13]
    state = it.get_state()
    assert state["mixture"]["streams"][0]["shard"] == "000.jsonl"
    batch = next(it)  # waits for the new shard
    assert batch["tokens"][:, 0].tolist() == [2, 2] and batch["tokens"][:, 2].tolist() == [17, 18]
    # Restart from the saved position (a fresh process): the same next batch.
    stream2 = ShardStream(str(d), stop_at_end=True)
    it2 = make_train_iterator(
        stream2, _by_source, seq_len=4, batch_size=2, packing=False, shard_index=0, shard_count=1
    )
    it2.set_state(state)
    _assert_same([next(it2)], [batch])


def test_pairs_and_eval_batches(tokenizer, jsonl):
    path = jsonl(
        "pref.jsonl", [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(5)]
    )
    encode = make_encoder("preference", tokenizer, max_len=16)
    batches = make_eval_batches(
        path, encode, seq_len=16, batch_size=2, shard_index=0, shard_count=1
    )
    assert len(batches) == 3
    for b in batches:
        validate_batch(b, require=())
        assert set(b) == {
            f"{p}{f}"
            for p in ("chosen_", "rejected_")
            for f in ("tokens", "positions", "segment_ids", "loss_mask")
        }
    assert not batches[-1]["chosen_segment_ids"][1].any()  # padding row
    rank = jsonl(
        "rank.jsonl",
        [
            {
                "prompt": "q",
                "responses": ["a", "b", "c"][: 2 + i % 2],
                "ranking": [1, 0, 2][: 2 + i % 2],
            }
            for i in range(2)
        ],
    )
    (b,) = make_eval_batches(
        rank,
        make_encoder("ranking", tokenizer, max_len=8),
        seq_len=8,
        batch_size=2,
        shard_index=0,
        shard_count=1,
    )
    assert b["cand_tokens"].shape == (2, 3, 8) and b["ranks"].tolist() == [[1, 0, -1], [1, 0, 2]]
    cls = jsonl("cls.jsonl", [{"text": "red", "label": i % 2} for i in range(3)])
    (b, _) = make_eval_batches(
        cls,
        make_encoder("classification", tokenizer, max_len=8),
        seq_len=8,
        batch_size=2,
        shard_index=0,
        shard_count=1,
    )
    validate_batch(b)
    assert b["labels"].dtype == np.int32 and b["labels"].tolist() == [0, 1]


def _hosts_global(make, count, steps):
    """The global batches of `count` hosts (their rows joined in host order), and the hosts'
    iterators; make(index, count) builds one host's iterator."""
    its = [make(h, count) for h in range(count)]
    per_host = [_take(it, steps) for it in its]
    joined = [
        {k: np.concatenate([per_host[h][s][k] for h in range(count)]) for k in per_host[0][s]}
        for s in range(steps)
    ]
    return joined, its


@pytest.mark.parametrize("packing", [True, False])
def test_global_batch_the_same_on_any_host_count(tokenizer, jsonl, make_corpus, packing):
    # A weighted mixture of two files (domain's shape) of records of very different lengths,
    # some split into several chunks: packed rows hold several examples each.
    texts = make_corpus(80, seed=5)
    a = jsonl("a.jsonl", [{"text": " ".join(texts[i : i + 1 + i % 4])} for i in range(40)])
    b = jsonl("b.jsonl", [{"text": t} for t in texts[40:]])
    encode = make_encoder("text", tokenizer, max_len=16, truncation="split")

    def make(index, count):
        return make_train_iterator(
            [a, b], encode, seq_len=16, batch_size=4, packing=packing, seed=3,
            weights=[0.7, 0.3], shard_index=index, shard_count=count,
        )  # fmt: skip

    one, _ = _hosts_global(make, 1, 12)
    if packing:
        assert max(int(b["segment_ids"].max()) for b in one) > 1  # rows do hold several examples
    for count in (2, 4):
        joined, its = _hosts_global(make, count, 12)
        _assert_same(joined, one)
        if packing:  # every host read the global stream: one data state, one set of counters
            assert all(it.get_state() == its[0].get_state() for it in its)
            assert all(it.stats == its[0].stats for it in its)


def test_packed_state_resumes_on_another_host_count(tokenizer, jsonl, make_corpus):
    texts = make_corpus(60, seed=9)
    path = jsonl("t.jsonl", [{"text": " ".join(texts[i : i + 3])} for i in range(0, 60, 2)])
    encode = make_encoder("text", tokenizer, max_len=16, truncation="split")

    def make(index, count):
        return make_train_iterator(
            path, encode, seq_len=16, batch_size=4, packing=True, seed=1,
            shard_index=index, shard_count=count,
        )  # fmt: skip

    reference, _ = _hosts_global(make, 1, 10)
    # Two hosts train 4 steps and save; the state (the same on both) resumes 1 host and 4 hosts.
    first, its = _hosts_global(make, 2, 4)
    _assert_same(first, reference[:4])
    state = json.loads(json.dumps(its[1].get_state()))
    for count in (1, 4):
        resumed = [make(h, count) for h in range(count)]
        for it in resumed:
            it.set_state(state)
        rest = [_take(it, 6) for it in resumed]
        joined = [
            {k: np.concatenate([rest[h][s][k] for h in range(count)]) for k in rest[0][s]}
            for s in range(6)
        ]
        _assert_same(joined, reference[4:])


@pytest.mark.parametrize("packing", [True, False])
def test_stream_mixture_global_batch_on_two_hosts(tmp_path, packing):
    # continual's shape: a growing shard directory mixed with a replay list and a general list.
    d = tmp_path / "stream"
    d.mkdir()
    for s in range(3):
        (d / f"{s:03d}.jsonl").write_text(
            "".join(json.dumps({"src": 1, "i": 10 * s + i}) + "\n" for i in range(7))
        )
    replay = [{"src": 2, "i": i} for i in range(5)]
    general = [{"src": 2, "i": 50 + i} for i in range(9)]

    def encode(r):  # lengths 2..4: several per packed row of 8
        return {"tokens": [r["src"]] * (1 + r["i"] % 3) + [r["i"] + 10], "loss_mask": [1] * 4}

    def make(index, count):
        return make_train_iterator(
            [ShardStream(str(d)), replay, general], encode, seq_len=8, batch_size=4,
            packing=packing, seed=2, weights=[0.6, 0.1, 0.3], shard_index=index,
            shard_count=count,
        )  # fmt: skip

    one, _ = _hosts_global(make, 1, 5)
    joined, its = _hosts_global(make, 2, 5)
    _assert_same(joined, one)
    if packing:
        assert its[0].get_state() == its[1].get_state()
