"""Sources: JSONL random access, bad records, open_source specs, ArrayRecord, ShardStream."""

import json
import os

import pytest

from fft.config_lib import FFTError
from fft.data.sources import BadRecordError, JsonlSource, ShardStream, open_source


def test_jsonl_random_access(jsonl):
    a = jsonl("a.jsonl", [{"i": 0}, {"i": 1}])
    b = jsonl("b.jsonl", [{"i": 2}, "   ", {"i": 3}])  # a blank line is not a record
    src = JsonlSource([a, b])
    assert len(src) == 4
    assert [src[i]["i"] for i in (3, 0, 2, 1)] == [3, 0, 2, 1]
    assert src.origin(3) == f"{b}:3"


def test_bad_record_names_file_and_line(jsonl):
    path = jsonl("bad.jsonl", [{"i": 0}, "", '{"i": oops}', "[1, 2]", {"i": 4}])
    src = JsonlSource(path)
    with pytest.raises(BadRecordError, match=f"{path}:3: bad JSON"):
        src[1]
    with pytest.raises(BadRecordError, match=f"{path}:4: record is a list"):
        src[2]
    skipping = JsonlSource(path, on_bad_record="skip")
    assert [skipping[i] for i in range(len(skipping))] == [{"i": 0}, None, None, {"i": 4}]
    assert skipping.skipped == 2
    with pytest.raises(FFTError, match="on_bad_record"):
        JsonlSource(path, on_bad_record="ignore")


def test_open_source_specs(tmp_path, jsonl):
    jsonl("x1.jsonl", [{"i": 0}])
    jsonl("x2.jsonl", [{"i": 1}, {"i": 2}])
    assert len(open_source(str(tmp_path))) == 3
    assert len(open_source(str(tmp_path / "x*.jsonl"))) == 3
    assert len(open_source(str(tmp_path / "x2.jsonl"))) == 2
    with pytest.raises(FFTError, match="missing.jsonl"):
        open_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FFTError, match="no data files"):
        open_source(str(tmp_path / "none*.jsonl"))


def test_array_record_source(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "data.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for i in range(5):
        writer.write(json.dumps({"text": f"record {i}"}).encode())
    writer.write(b"not json")
    writer.close()
    src = open_source(path, on_bad_record="skip")
    assert len(src) == 6 and src[4] == {"text": "record 4"} and src[5] is None
    with pytest.raises(BadRecordError, match="record5"):
        open_source(path)[5]


def test_shard_stream_picks_up_new_shards_and_resumes(tmp_path, jsonl):
    jsonl("000.jsonl", [{"i": 0}, {"i": 1}])
    stream = ShardStream(str(tmp_path), stop_at_end=True)
    assert stream.next_record()[0] == {"i": 0}
    state = stream.get_state()
    assert json.loads(json.dumps(state)) == state
    assert stream.next_record()[0] == {"i": 1}
    jsonl("001.jsonl", [{"i": 2}, "{bad"])
    with open(tmp_path / "002.jsonl.tmp", "w") as f:  # not matched: written atomically later
        f.write('{"i": 99}\n')
    assert stream.next_record()[0] == {"i": 2}
    with pytest.raises(BadRecordError, match=r"001.jsonl:2"):
        stream.next_record()
    os.rename(tmp_path / "002.jsonl.tmp", tmp_path / "002.jsonl")
    assert stream.next_record()[0] == {"i": 99}
    with pytest.raises(StopIteration):
        stream.next_record()
    restored = ShardStream(str(tmp_path), on_bad_record="skip")
    restored.set_state(state)
    assert [r and r["i"] for r in restored] == [1, 2, None, 99]
    assert restored.skipped == 1
