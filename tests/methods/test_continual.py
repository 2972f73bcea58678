"""Continual pre-training: era shards arrive and are consumed, mixture weights hold, a malformed
line is named, and a run SIGKILLed mid-stream resumes on exactly the examples it would have seen.

The loader itself is tested in tests/data/test_pipeline.py (resume mid-stream gives identical
batches, a shard added while iterating is consumed, weights honoured) and test_sources.py.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fft import config_lib, tokenizers, zoo
from fft.data.sources import BadRecordError
from fft.data.synthetic import World
from fft.methods import continual

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def smoke_config(**overrides):
    return config_lib.load_config(f"{REPO}/configs/continual.py", "smoke", **overrides)


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizers.load_tokenizer(os.path.join(zoo.resolve("fft:micro"), "tokenizer"))


def digest(batch) -> str:
    return hashlib.md5(batch["tokens"].tobytes() + batch["loss_mask"].tobytes()).hexdigest()[:12]


def test_eras_arrive_are_consumed_and_resume_exactly(tmp_path, world, tokenizer):
    config = smoke_config()
    stream = tmp_path / "stream"
    it = continual.build_train_data(config, str(tmp_path), world, tokenizer)
    steps_per_era = config.steps // config.continual.eras
    batches, states, shards = [], [], []
    for i in range(config.steps):
        if i == steps_per_era:  # the producer has not written era 1 yet: it arrives now
            assert not any(n.startswith("era01-") for n in os.listdir(stream))
        states.append(it.get_state())
        batches.append(next(it))
        shards.append(it.get_state()["inner"]["mixture"]["streams"][0]["shard"])
    assert any(n.startswith("era01-") for n in os.listdir(stream))
    # Era 0 reads era-0 shards; era 1 moves on to era-1 shards (new shards consumed).
    assert all(s.startswith("era00-") for s in shards[:steps_per_era])
    assert all(s.startswith("era01-") for s in shards[steps_per_era:])
    # Resume from any saved position (mid-era and at the era boundary): the same batches.
    for at in (steps_per_era - 1, steps_per_era, steps_per_era + 1):
        it2 = continual.build_train_data(config, str(tmp_path), world, tokenizer)
        it2.set_state(json.loads(json.dumps(states[at])))  # as checkpointed (JSON)
        for i in range(at, config.steps):
            assert digest(next(it2)) == digest(batches[i]), (at, i)


def test_mixture_weights_are_honoured(tmp_path, world, tokenizer):
    overrides = {"continual.replay": 0.3, "continual.general": 0.2, "continual.docs_per_era": 400}
    config = smoke_config(steps=80, **overrides)  # enough era data that no source runs dry
    it = continual.build_train_data(config, str(tmp_path), world, tokenizer)
    for _ in range(60):  # deep into era 1: stream, replay and general all live
        next(it)
    counts = np.asarray(it.get_state()["inner"]["mixture"]["counts"], float)
    base = np.asarray(it.get_state()["inner"]["mixture"]["base"], float)
    share = (counts - base) / (counts - base).sum()
    np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=0.03)


def test_malformed_line_is_named(tmp_path, world, tokenizer):
    stream = tmp_path / "mine"
    stream.mkdir()
    lines = [json.dumps({"text": t}) for t in world.fact_corpus(0, 4)]
    lines.insert(2, '{"text": "unterminated')
    (stream / "era00-00000.jsonl").write_text("\n".join(lines) + "\n")
    config = smoke_config(**{"continual.stream_dir": str(stream)})
    it = continual.build_train_data(config, str(tmp_path), world, tokenizer)
    with pytest.raises(BadRecordError, match=r"era00-00000\.jsonl:3"):
        for _ in range(config.steps):
            next(it)


DRIVER = textwrap.dedent(
    """
    import hashlib, os, sys, time
    repo, workdir, block_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.path.insert(0, repo)
    from fft import config_lib, main
    from fft.methods import continual

    original = continual.EraIterator.__next__

    def logged_next(self):
        batch = original(self)
        index = self.batches - 1
        h = hashlib.md5(batch["tokens"].tobytes() + batch["loss_mask"].tobytes()).hexdigest()[:12]
        with open(os.path.join(workdir, "batches.txt"), "a") as f:
            f.write(f"{index} {h}\\n")
        if index == block_at:
            print(f"BLOCKED {index}", flush=True)
            while not os.path.exists(os.path.join(workdir, "release")):
                time.sleep(0.05)
        return batch

    continual.EraIterator.__next__ = logged_next
    config = config_lib.load_config(os.path.join(repo, "configs/continual.py"), "smoke")
    results = main.run(config, workdir)
    print("DONE", sorted(results.get("eras", {})), flush=True)
    """
)


def _start(script, workdir, block_at):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, str(script), REPO, str(workdir), str(block_at)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


def test_sigkill_then_resume_sees_the_same_examples(tmp_path, world, tokenizer):
    config = smoke_config()
    ref = continual.build_train_data(config, str(tmp_path / "ref"), world, tokenizer)
    expected = [digest(next(ref)) for _ in range(config.steps)]

    script, workdir = tmp_path / "driver.py", tmp_path / "run"
    script.write_text(DRIVER)
    workdir.mkdir()
    proc = _start(script, workdir, block_at=6)  # era 1 (4 steps per era), after checkpoint 4
    deadline, seen = time.time() + 600, []
    for line in proc.stdout:
        seen.append(line)
        if "BLOCKED 6" in line:
            break
        assert time.time() < deadline, "".join(seen)
    else:
        raise AssertionError("".join(seen))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    out, _ = _start(script, workdir, block_at=-1).communicate(timeout=600)
    assert "DONE" in out, out[-3000:]
    resumed_at = int(out.split("Resuming from checkpoint at step ")[1].split(".")[0])
    assert resumed_at in (2, 4, 6)
    logged = [line.split() for line in (workdir / "batches.txt").read_text().splitlines()]
    # Every batch either process trained on is the batch an uninterrupted run trains on.
    assert [h for i, h in logged] == [expected[int(i)] for i, h in logged]
    assert [int(i) for i, _ in logged][-(config.steps - resumed_at) :] == list(
        range(resumed_at, config.steps)
    )
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["eras"]) == {"before", "0", "1"}
    for key in ("current_fact_acc", "past_fact_acc", "general_ppl"):
        assert key in results["after"]
