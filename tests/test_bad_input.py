"""Bad input, fuzzed: malformed JSONL, wrong field types, empty files, non-UTF-8 bytes, truncated
ArrayRecord files, truncated checkpoints and a tokenizer too big for its model each give one
clear error (an FFTError naming the file and line / record / checkpoint), or a counted skip under
`data.on_bad_record=skip`; never a traceback, and no file already in the workdir is changed.

The loaders are exercised directly (hypothesis, fast); four `python -m fft.main` runs check that
the command line reports the same errors as one `fft: error:` line.
"""

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fft.config_lib import FFTError
from fft.data import formats, pipeline
from fft.data.sources import BadRecordError, open_source
from fft.tokenizers import train_sentencepiece
from tests.data.conftest import corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same cases on every run: a failure here is never a flake
    database=None,  # and no .hypothesis/ folder in the checkout
)
LABELS = ("neg", "pos")


@pytest.fixture(scope="module")
def tokenizer():
    return train_sentencepiece(corpus(), 320, user_defined_symbols=["<|user|>", "<|assistant|>"])


# ---------------------------------------------------------------------------------------------
# Records: good ones of every format, and mutations that make them bad
# ---------------------------------------------------------------------------------------------

words = st.text(alphabet="the cat sat on a mat é中🙂\t{}", max_size=30)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": words}),
    max_size=2,
).map(lambda ms: ms + [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])


def _ranking(draw):
    k = draw(st.integers(1, 3))
    return {
        "prompt": draw(st.one_of(words, messages.map(lambda m: m[:-1]))),
        "responses": draw(st.lists(words, min_size=k, max_size=k)),
        "ranking": draw(st.permutations(list(range(k)))),
    }


@st.composite
def good_record(draw, fmt):
    """A record of `fmt` that encodes."""
    if fmt == "text":
        return {"text": draw(words)}
    if fmt == "instruction":
        r = {"instruction": draw(words), "output": draw(words)}
        if draw(st.booleans()):
            r["input"] = draw(st.one_of(st.none(), words))
        return r
    if fmt == "prompt_completion":
        return {"prompt": draw(words), "completion": draw(words)}
    if fmt == "chat":
        msgs = draw(messages)
        if draw(st.booleans()):
            return {"messages": msgs}
        share = {"user": "human", "assistant": "gpt", "system": "system"}
        return {"conversations": [{"from": share[m["role"]], "value": m["content"]} for m in msgs]}
    if fmt == "preference":
        prompt = draw(st.one_of(words, messages.map(lambda m: m[:-1])))
        return {"prompt": prompt, "chosen": draw(words), "rejected": draw(words)}
    if fmt == "ranking":
        return _ranking(draw)
    assert fmt == "classification"
    r = {"text": draw(words)}
    if draw(st.booleans()):
        r["label"] = draw(st.sampled_from([*LABELS, 0, 1]))
    else:
        r["labels"] = draw(st.lists(st.sampled_from([*LABELS, 0, 1]), max_size=2))
    return r


not_a_string = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(st.integers(), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
bad_messages = st.one_of(
    st.integers(),
    st.booleans(),
    st.lists(st.integers(), min_size=1, max_size=2),
    st.just([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]),
    st.just([{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "x"}]),
    st.just([{"content": "x"}, {"role": "assistant", "content": "x"}]),
    st.just([{"role": "user", "content": "no assistant turn"}]),
)
# field -> strategy of values that make the record bad (None: delete the field)
BAD_FIELDS = {
    "text": {"text": not_a_string},
    "instruction": {
        "instruction": not_a_string,
        "output": not_a_string,
        "input": not_a_string,  # optional, but a number is not an input text
    },
    "prompt_completion": {
        "prompt": not_a_string.filter(lambda v: v != []),
        "completion": not_a_string,
    },
    "chat": {"messages": bad_messages, "conversations": bad_messages},
    "preference": {
        "prompt": st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=2)),
        "chosen": not_a_string,
        "rejected": not_a_string,
    },
    "ranking": {
        "prompt": st.one_of(st.integers(), st.just([{"role": 1, "content": "x"}])),
        "responses": st.one_of(st.integers(), st.just([]), st.just([1, 2, 3])),
        "ranking": st.one_of(
            st.just("0,1"), st.just([0.5, 1.5, 2.5]), st.just(["a", "b", "c"]), st.just([-1] * 3)
        ),
    },
    "classification": {
        "text": not_a_string,
        "label": st.one_of(st.just("maybe"), st.just(2), st.just(-1), st.just([0]), st.just({})),
        "labels": st.one_of(st.just("neg"), st.just([7]), st.just([1.5]), st.just([None])),
    },
}
REQUIRED = {
    "text": ["text"],
    "instruction": ["instruction", "output"],
    "prompt_completion": ["prompt", "completion"],
    "chat": ["messages", "conversations"],
    "preference": ["prompt", "chosen", "rejected"],
    "ranking": ["prompt", "responses", "ranking"],
    "classification": ["text", "label", "labels"],
}


@st.composite
def bad_record(draw, fmt):
    """A JSON object of `fmt` with a missing field or a field of the wrong type / value."""
    record = draw(good_record(fmt))
    present = [f for f in REQUIRED[fmt] if f in record]
    if draw(st.booleans()) and present:
        del record[draw(st.sampled_from(present))]
        return record
    choices = [f for f in BAD_FIELDS[fmt] if f in record or f == "input"]
    field = draw(st.sampled_from(choices))
    if fmt == "ranking" and field == "ranking" and not isinstance(record["responses"], list):
        field = "responses"
    record[field] = draw(BAD_FIELDS[fmt][field])
    if fmt == "ranking" and field == "ranking" and len(record["responses"]) != 3:
        record["responses"] = ["a", "b", "c"]  # the bad ranking values have three entries
    return record


# Lines that are bad whatever the format: not JSON, not an object, not UTF-8, not Unicode.
raw_bad_lines = st.one_of(
    st.sampled_from(
        [
            b'{"text": ',
            b"{bad}",
            b"nul",
            b"[1, 2]",
            b'"just a string"',
            b"1e999",
            b"{'text': 'single quotes'}",
            b'{"text": "a"} trailing',
            b'{"text": "caf\xc3\x28"}',  # an invalid UTF-8 sequence inside a string
            b'\xff\xfe{"text": "x"}',  # a UTF-16 byte order mark on a UTF-8 line
            b'{"text": "lone \\ud800 surrogate", "instruction": "\\udfff", "prompt": "\\ud800"}',
            b"[" * 50_000,  # nested too deep for json.loads
            b'{"text": ' + b"1" * 5000 + b"}",  # an integer beyond Python's digit limit
        ]
    ),
    # random bytes after a lone continuation byte: never UTF-8 (no NUL, so never UTF-16)
    st.binary(max_size=40).map(lambda b: b"\x80" + b.replace(b"\n", b"").replace(b"\x00", b"")),
)


def _line(record) -> bytes:
    return json.dumps(record).encode()


@st.composite
def jsonl_case(draw):
    """(format, [(line bytes, kind)]) with kind 'good', 'bad' or 'blank'."""
    fmt = draw(st.sampled_from(formats.FORMATS))
    kinds = draw(st.lists(st.sampled_from(["good", "good", "bad", "raw", "blank"]), max_size=8))
    lines = [(_line(draw(good_record(fmt))), "good")]  # at least one record: not an empty file
    for kind in kinds:
        if kind == "good":
            lines.append((_line(draw(good_record(fmt))), "good"))
        elif kind == "bad":
            lines.append((_line(draw(bad_record(fmt))), "bad"))
        elif kind == "raw":
            lines.append((draw(raw_bad_lines), "bad"))
        else:
            lines.append((draw(st.sampled_from([b"", b"  ", b"\t\r"])), "blank"))
    return fmt, draw(st.permutations(lines))


def _encoder(fmt, tokenizer):
    names = LABELS if fmt == "classification" else None
    return pipeline.make_encoder(fmt, tokenizer, max_len=48, label_names=names)


def _eval_batches(path, fmt, tokenizer, on_bad_record):
    """(source, iterator, batches): every record once, in file order (what an eval reads)."""
    src = open_source(path, on_bad_record=on_bad_record)
    it = pipeline._build(
        [src], _encoder(fmt, tokenizer), weights=None, seed=0, shuffle=False, num_epochs=1,
        shard_index=0, shard_count=1, on_bad_record=on_bad_record, seq_len=48, batch_size=2,
        packing=fmt in ("text", "instruction", "prompt_completion", "chat"), pad_id=0,
        drop_remainder=False,
    )  # fmt: skip
    return src, it, list(it)


@FUZZ
@given(case=jsonl_case())
def test_fuzzed_jsonl_names_file_and_line_or_counts_skips(case, tokenizer, tmp_path_factory):
    fmt, lines = case
    path = os.path.join(tmp_path_factory.mktemp("fuzz"), f"{fmt}.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(line for line, _ in lines) + b"\n")
    bad_lines = [i + 1 for i, (_, kind) in enumerate(lines) if kind == "bad"]
    n_good = sum(kind == "good" for _, kind in lines)

    # error mode: the first bad line (the eval pipeline reads in file order) is named
    if bad_lines:
        with pytest.raises(BadRecordError) as e:
            _eval_batches(path, fmt, tokenizer, "error")
        message = str(e.value)
        assert f"{path}:{bad_lines[0]}:" in message and "\n" not in message, message
    else:
        _eval_batches(path, fmt, tokenizer, "error")

    # skip mode: every bad line counted, every good one encoded
    src, it, _ = _eval_batches(path, fmt, tokenizer, "skip")
    assert it.stats["skipped_records"] == len(bad_lines), it.stats
    assert it.stats["examples"] + it.stats["dropped_too_long"] >= n_good
    assert it.stats["records"] == n_good + len(bad_lines)


@FUZZ
@given(fmt=st.sampled_from(formats.FORMATS), data=st.data())
def test_fuzzed_records_are_bad_record_errors(fmt, data, tokenizer):
    """encode_record itself: a wrong type or a missing field is a BadRecordError, never a
    TypeError / KeyError / IndexError from deep inside."""
    record = data.draw(bad_record(fmt))
    with pytest.raises(BadRecordError):
        _encoder(fmt, tokenizer)(copy.deepcopy(record))


@pytest.mark.parametrize("content", [b"", b"\n\n   \n\t\n"], ids=["empty", "blank"])
def test_empty_file_is_named(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(FFTError, match=f"data file {path} holds no records"):
        open_source(str(path))
    (tmp_path / "d").mkdir()
    with pytest.raises(FFTError, match="no data files match"):
        open_source(str(tmp_path / "d"))


def test_all_records_skipped_is_an_error_not_a_hang(tmp_path, tokenizer):
    """A repeating train iterator over data that is all bad stops with a count, not a spin."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"txt": "a"}\n{bad\n\xff\n')
    src = open_source(str(path), on_bad_record="skip")
    it = pipeline.make_train_iterator(
        [src], _encoder("text", tokenizer), seq_len=32, batch_size=2, shard_index=0,
        shard_count=1, on_bad_record="skip",
    )  # fmt: skip
    with pytest.raises(FFTError, match=r"no usable example .* 3 bad records skipped"):
        next(it)


def test_field_values_names_the_record(tmp_path):
    """What pretraining reads to learn its tokenizer: a missing / non-string 'text' is named."""
    from fft.data.sources import field_values

    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a"}\n{"text": 5}\n{"body": "c"}\n{"text": "\\ud800"}\n')
    with pytest.raises(BadRecordError, match=f"{path}:2: field 'text' is int"):
        field_values(open_source(str(path)))
    src = open_source(str(path), on_bad_record="skip")
    assert field_values(src) == ["a"] and src.skipped == 3


# ---------------------------------------------------------------------------------------------
# ArrayRecord
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def array_record_bytes(tmp_path_factory):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path_factory.mktemp("ar") / "data.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for i in range(1500):
        writer.write(json.dumps({"text": f"record {i} " * 8}).encode())
    writer.close()
    with open(path, "rb") as f:
        return f.read()


@settings(FUZZ, max_examples=12)
@given(cut=st.floats(0, 1, exclude_max=True), flip=st.booleans())
def test_truncated_or_corrupt_array_record(array_record_bytes, tmp_path_factory, cut, flip):
    data = bytearray(array_record_bytes)
    if flip:  # corrupt bytes in the middle instead of cutting the end
        at = int(cut * (len(data) - 64))
        data[at : at + 64] = bytes(b ^ 0xFF for b in data[at : at + 64])
    else:
        data = data[: int(cut * len(data))]
    path = str(tmp_path_factory.mktemp("ar") / "cut.array_record")
    with open(path, "wb") as f:
        f.write(bytes(data))
    try:
        src = open_source(path)
    except FFTError as e:
        assert path in str(e) and "\n" not in str(e)
        return
    bad = 0
    for i in range(len(src)):
        try:
            record = src[i]
        except BadRecordError as e:
            assert f"{path}#record{i}" in str(e) and "\n" not in str(e)
            bad += 1
            continue
        assert record == {"text": f"record {i} " * 8}
    skipping = open_source(path, on_bad_record="skip")
    got = [skipping[i] for i in range(len(skipping))]
    assert skipping.skipped == bad and sum(r is None for r in got) == bad


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _snapshot(root) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    out = {}
    for d, _, names in os.walk(root):
        for name in names:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory):
    """A checkpoint directory with steps 1 and 2 of the toy model, and the restore target."""
    sys.path.insert(0, os.path.join(REPO, "tests", "train"))
    import jax

    from fft import checkpoint as ck
    from fft import sharding
    from tests.test_checkpoint import _toy_state

    root = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    c = ck.Checkpointer(root, keep=3)
    for step in (1, 2):
        c.save(step, _toy_state(step), {"data": {"index": step}})
    c.close()
    abstract = jax.eval_shape(lambda: _toy_state(0))
    mesh = sharding.make_mesh(data=8)
    target = sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh))
    expected = {s: jax.device_get(_toy_state(s).params) for s in (1, 2)}
    files = sorted(f for f in _snapshot(root) if f.startswith("2" + os.sep))
    return root, target, expected, files


def _same_tree(a, b) -> bool:
    import jax
    import numpy as np

    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(x, y) for x, y in pairs)


def _truncate(path, fraction):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))


@settings(FUZZ, max_examples=8)
@given(pick=st.integers(0, 10_000), fraction=st.sampled_from([0.0, 0.5, 0.9]))
def test_truncated_latest_checkpoint(saved_checkpoints, tmp_path_factory, pick, fraction):
    """Truncating any file of the newest checkpoint: it still restores bit-exactly, or the run
    falls back to step 1 with a warning; the damaged files are kept (renamed), byte for byte."""
    import jax

    from fft import checkpoint as ck

    base, target, expected, files = saved_checkpoints
    # A fresh directory per case: tensorstore caches file contents by path.
    root = os.path.join(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()), "checkpoints")
    shutil.copytree(base, root)
    _truncate(os.path.join(root, files[pick % len(files)]), fraction)
    before = _snapshot(root)
    c = ck.Checkpointer(root, keep=3)
    state, data, step = c.restore_latest(target)
    c.close()
    assert data == {"data": {"index": step}}
    assert _same_tree(jax.device_get(state.params), expected[step])
    after = _snapshot(root)
    renamed = {k.replace("2.corrupt-0", "2", 1): v for k, v in after.items()}
    assert renamed == before  # every byte is still there (a quarantined step is renamed only)


def test_all_checkpoints_truncated_is_one_error_and_changes_nothing(saved_checkpoints, tmp_path):
    from fft import checkpoint as ck

    base, target, _, _ = saved_checkpoints
    root = str(tmp_path / "checkpoints")
    shutil.copytree(base, root)
    for step in ("1", "2"):
        _truncate(os.path.join(root, step, "state", "_METADATA"), 0.5)
    before = _snapshot(root)
    c = ck.Checkpointer(root, keep=3)
    with pytest.raises(ck.CheckpointError, match=f"no checkpoint in {root} can be restored") as e:
        c.restore_latest(target)
    c.close()
    assert "\n" not in str(e.value)
    assert _snapshot(root) == before


def test_truncated_init_from_checkpoint_is_named(saved_checkpoints, tmp_path):
    """init_from / fft.load of a workdir whose checkpoint is truncated: one error naming it."""
    from flax import nnx
    from toy_lm import build  # tests/train, on sys.path

    from fft import checkpoint as ck
    from fft import pretrained

    base, _, _, _ = saved_checkpoints
    workdir = tmp_path / "run"
    shutil.copytree(base, workdir / "checkpoints")
    shutil.rmtree(workdir / "checkpoints" / "1")
    _truncate(workdir / "checkpoints" / "2" / "state" / "_METADATA", 0.5)
    step_dir = str(workdir / "checkpoints" / "2")
    with pytest.raises(ck.CheckpointError, match=f"checkpoint {step_dir} cannot be read"):
        pretrained.read_raw_params(str(workdir))
    abstract = nnx.state(nnx.eval_shape(build()))
    with pytest.raises(ck.CheckpointError, match=f"checkpoint {step_dir} cannot be read"):
        ck.load_state(str(workdir), abstract)


# ---------------------------------------------------------------------------------------------
# A tokenizer of the wrong vocabulary size
# ---------------------------------------------------------------------------------------------


def _fake_workdir(path, tokenizer, vocab_size):
    """An fft workdir holding model.json (micro, `vocab_size` rows) and `tokenizer`."""
    from fft.models import presets

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model.json"), "w") as f:
        json.dump(presets.get_preset("micro").replace(vocab_size=vocab_size).to_dict(), f)
    tokenizer.save(os.path.join(path, "tokenizer"))
    return str(path)


def test_tokenizer_bigger_than_model_vocab_is_named(tmp_path, tokenizer):
    import fft
    from fft import pretrained, tokenizers

    workdir = _fake_workdir(tmp_path / "run", tokenizer, 300)
    pattern = f"tokenizer {workdir}/tokenizer has 320 tokens but the model {workdir}/model.json"
    with pytest.raises(tokenizers.VocabMismatchError, match=pattern + " has vocab_size=300"):
        pretrained.load_spec(workdir)
    with pytest.raises(tokenizers.VocabMismatchError, match="320 tokens .* vocab_size=300"):
        fft.load(workdir)
    # a model with more rows than the tokenizer has ids (a padded vocabulary) is fine
    assert pretrained.load_spec(_fake_workdir(tmp_path / "ok", tokenizer, 384)).tokenizer


# ---------------------------------------------------------------------------------------------
# The command line: one `fft: error:` line, the workdir's files untouched (4 runs, ~10 s each)
# ---------------------------------------------------------------------------------------------


def _workdir_with_history(path):
    """A workdir holding what an earlier run left: metrics, a config, a (fake) checkpoint."""
    (path / "checkpoints" / "7").mkdir(parents=True)
    (path / "checkpoints" / "7" / "state.bin").write_bytes(os.urandom(256))
    (path / "metrics.jsonl").write_text('{"step": 7, "loss": 2.5}\n')
    (path / "notes.txt").write_text("my notes\n")
    return _snapshot(path)


def _cli(tmp_path, *overrides):
    workdir = tmp_path / "w"
    before = _workdir_with_history(workdir)
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run(
        [sys.executable, "-m", "fft.main", "--config=configs/pretrain.py:smoke",
         f"--workdir={workdir}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("fft: error:")]
    assert len(errors) == 1, r.stderr
    after = _snapshot(workdir)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed
    return errors[0]


def test_cli_record_without_its_field(tmp_path):
    """A record with a misspelt field (the tokenizer is learned from the data first)."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        b'{"text": "fine"}\n\n{"text": "also fine"}\n{"txt": "typo"}\n{"text": oops}\n'
    )
    line = _cli(tmp_path, f"--config.data.train={path}")
    assert f"{path}:4: field 'text' is missing" in line


def test_cli_empty_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"")
    assert f"data file {path} holds no records" in _cli(tmp_path, f"--config.data.train={path}")


def test_cli_truncated_array_record(tmp_path, array_record_bytes):
    path = tmp_path / "train.array_record"
    path.write_bytes(array_record_bytes[: len(array_record_bytes) // 2])
    line = _cli(tmp_path, f"--config.data.train={path}")
    assert f"cannot read ArrayRecord file {path}" in line


def test_cli_tokenizer_of_the_wrong_size(tmp_path, tokenizer):
    base = _fake_workdir(tmp_path / "base", tokenizer, 300)
    line = _cli(tmp_path, f"--config.init_from={base}")
    assert "has 320 tokens" in line and "vocab_size=300" in line and base in line


def test_dpo_and_rlhf_user_data_skip_or_name_bad_lines(tmp_path, capsys):
    """Preference pairs (DPO) and prompts (PPO) from a user file: a bad line is a counted skip
    under data.on_bad_record=skip, one error naming file:line otherwise (a None record reached
    the encoder before)."""
    from fft import config_lib
    from fft.methods import dpo, rlhf

    root = os.path.join(os.path.dirname(__file__), "..")
    pairs = tmp_path / "pairs.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    pairs.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(good) + "\n")
    for name, read in (
        ("dpo", lambda c: dpo.pair_records(c, None)),
        ("rlhf", lambda c: rlhf.prompt_records(c, None)[0]),
    ):
        config = config_lib.load_config(os.path.join(root, f"configs/{name}.py"), "smoke")
        with config.unlocked():
            config.data.train = str(pairs)
            config.data.format = "preference" if name == "dpo" else "instruction"
            config.data.on_bad_record = "skip"
        assert read(config) == [good, good]
        assert "skipped 1 bad records" in capsys.readouterr().out
        with config.unlocked():
            config.data.on_bad_record = "error"
        with pytest.raises(BadRecordError, match=r"pairs.jsonl:2"):
            read(config)
