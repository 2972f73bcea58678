"""Instruction tuning: response-only loss masks through the method's pipeline, packing isolation
in the model, the configs, and smoke runs through `fft.main.run` (results.json, resume, an HF
model directory with its chat template plus user JSONL)."""

import ast
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fft
from fft import config_lib, main, tokenizers, zoo
from fft.methods import instruction
from fft.models import presets
from fft.models.transformer import Transformer
from fft.train import lm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "instruction.py")


def _get_config(variant="smoke"):
    return config_lib.load_config(CONFIG, variant)


@pytest.fixture(scope="module")
def micro_dir():
    return zoo.resolve("fft:micro")


@pytest.fixture(scope="module")
def tok(micro_dir):
    return tokenizers.load_tokenizer(os.path.join(micro_dir, "tokenizer"))


def _segments(batch):
    """(tokens, loss_mask) of every packed example in a batch."""
    out = []
    for row in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in range(1, int(seg.max()) + 1):
            idx = seg == s
            out.append((batch["tokens"][row][idx].tolist(), batch["loss_mask"][row][idx].tolist()))
    return out


def _first_batch(config, tok, records, **data):
    with config.unlocked():
        config.data.shuffle = False
        config.batch_size = 2
        for k, v in data.items():
            config.data[k] = v
    it = instruction.train_iterator(config, tok, records)
    return next(it), it


# ---------------------------------------------------------------------------------------------
# Loss masks: the targets are exactly the responses (+ eos), through the method's own pipeline
# ---------------------------------------------------------------------------------------------

INSTRUCTION = [
    {"instruction": "Reverse the words.", "input": "red blue", "output": "blue red"},
    {"instruction": "Count the words.", "output": "3"},  # no input block
]
PROMPT_COMPLETION = [{"prompt": "Q: two plus two?\nA:", "completion": " four"}]


@pytest.mark.parametrize(
    "fmt,records,answers",
    [
        ("instruction", INSTRUCTION, ["blue red", "3"]),
        ("prompt_completion", PROMPT_COMPLETION, [" four"]),
    ],
)
def test_single_turn_loss_on_response_only(tok, fmt, records, answers):
    batch, _ = _first_batch(_get_config(), tok, records, format=fmt)
    segments = _segments(batch)
    assert len(segments) >= len(records)  # packed: several examples per row
    for (tokens, mask), answer in zip(segments, answers, strict=False):
        targets = [t for t, m in zip(tokens, mask, strict=True) if m]
        assert targets[-1] == tok.eos_id
        # The space before an answer belongs to the answer (fft.data.formats._space_to_target).
        assert tok.decode(targets[:-1]).strip() == answer.strip()
        # Every target comes after every prompt token: the mask is one suffix.
        first = mask.index(1)
        assert all(mask[first:]) and not any(mask[:first])


def test_multi_turn_chat_trains_every_assistant_turn(tok):
    dialog = {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Reverse: red blue"},
            {"role": "assistant", "content": "blue red"},
            {"role": "user", "content": "Now count that."},
            {"role": "assistant", "content": "2"},
        ]
    }
    batch, _ = _first_batch(_get_config(), tok, [dialog], format="chat")
    tokens, mask = _segments(batch)[0]
    # Split the targets into runs: one per assistant turn, each ending in eos.
    runs, cur = [], []
    for t, m in zip(tokens, mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    assert [tok.decode(r[:-1]) for r in runs] == [" blue red", " 2"]
    assert all(r[-1] == tok.eos_id for r in runs)
    # The system and user turns are context only.
    context = tok.decode([t for t, m in zip(tokens, mask, strict=True) if not m])
    assert "Answer briefly." in context and "Now count that." in context


def test_train_on_prompt_switch(tok):
    batch, _ = _first_batch(_get_config(), tok, INSTRUCTION, train_on_prompt=True)
    for _, mask in _segments(batch):
        assert mask == [0] + [1] * (len(mask) - 1)  # only each segment's first token is free


def test_overlong_examples_truncated_or_dropped_and_counted(tok):
    long = {"instruction": "Copy. " + "red blue green " * 40, "output": "red"}
    config = _get_config()
    with config.unlocked():
        config.seq_len = 48
    batch, it = _first_batch(config, tok, [long, INSTRUCTION[1]], truncation="prompt")
    assert it.stats["truncated"] >= 1 and it.stats["dropped_too_long"] == 0
    tokens, mask = _segments(batch)[0]
    assert len(tokens) == 48 and tokens[0] == tok.bos_id  # the prompt side was cut
    assert tok.decode([t for t, m in zip(tokens, mask, strict=True) if m][:-1]) == " red"
    config = _get_config()
    with config.unlocked():
        config.seq_len = 48
    _, it = _first_batch(config, tok, [long, INSTRUCTION[1]], truncation="drop")
    assert it.stats["dropped_too_long"] >= 1 and it.stats["truncated"] == 0


# ---------------------------------------------------------------------------------------------
# Packing isolation: an example's logits do not depend on what is packed beside it
# ---------------------------------------------------------------------------------------------


def test_grad_accumulation_is_the_whole_batch(tok, micro_dir):
    """grad_accum=4 gives the update of one batch of all the rows: the smoke config's packed,
    response-only batch, whose microbatches hold different numbers of target tokens."""
    import jax
    import optax

    from fft.train.state import TrainState, split_model
    from fft.train.step import make_train_step

    config = _get_config()
    with config.unlocked():
        config.batch_size = 8
        config.model.dtype = "float32"
        config.init_from = micro_dir
    base = lm.load_base(config)
    records = instruction._records(config, config.data.train, "train", 64)
    batch = {
        k: jnp.asarray(v) for k, v in next(instruction.train_iterator(config, tok, records)).items()
    }
    mask = np.asarray(batch["loss_mask"])[:, 1:]
    per_micro = [mask[i::4].sum() for i in range(4)]
    assert len(set(per_micro)) > 1, per_micro  # the weighting matters for this batch

    graphdef, params, frozen = split_model(
        lm.model_builder(base.model_config, config)(), lm.trainable_filter(config)
    )
    # SGD with lr 1: the update is the gradient itself (Adam's first step is ~sign(g), which
    # turns f32 rounding of near-zero gradients into lr-sized differences).
    tx = optax.sgd(1.0)
    out = []
    for k in (1, 4):
        state = TrainState(jnp.zeros((), jnp.int32), params, frozen, tx.init(params),
                           jax.random.key(0))  # fmt: skip
        step = jax.jit(make_train_step(graphdef, lm.next_token_loss_fn(), tx, grad_accum=k))
        out.append(step(state, batch))
    (s1, m1), (s4, m4) = out
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert float(m4["target_tokens"]) == float(m1["target_tokens"]) == mask.sum()
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # f32 summation order


def test_packing_isolation_in_the_model():
    cfg = presets.get_preset("micro")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a = rng.integers(3, cfg.vocab_size, 11)
    b = rng.integers(3, cfg.vocab_size, 9)
    t = 24

    def row(segments):
        tokens = np.zeros((1, t), np.int32)
        pos = np.zeros((1, t), np.int32)
        seg = np.zeros((1, t), np.int32)
        start = 0
        for i, s in enumerate(segments):
            tokens[0, start : start + len(s)] = s
            pos[0, start : start + len(s)] = np.arange(len(s))
            seg[0, start : start + len(s)] = i + 1
            start += len(s)
        return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)

    alone = model(*row([a]))[0, : len(a)]
    packed = model(*row([b, a]))[0, len(b) : len(b) + len(a)]
    np.testing.assert_allclose(np.asarray(alone), np.asarray(packed), atol=1e-5)
    # And the masked loss of `a` is the same whether or not `b` shares its row.
    loss_fn = lm.next_token_loss_fn()

    def loss(segments, which):
        tokens, pos, seg = row(segments)
        mask = (seg == which).astype(jnp.float32).at[:, :].multiply(pos > 0)
        batch = {"tokens": tokens, "positions": pos, "segment_ids": seg, "loss_mask": mask}
        return float(loss_fn(model, batch, None)[0])

    assert loss([a], 1) == pytest.approx(loss([b, a], 2), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def test_config_variants_validate_and_every_field_is_commented():
    from fft import config_lib

    for variant in ("", "full", "lora", "smoke"):
        c = _get_config(variant)
        config_lib.validate(c)
        assert c.method == "instruction"
    assert _get_config("lora").lora.rank > 0 and _get_config("full").lora.rank == 0
    assert _get_config("smoke").init_from == "fft:micro"
    assert _get_config("").init_from == "fft:tiny"
    with pytest.raises(config_lib.ConfigError, match="variant"):
        _get_config("nope")
    source = open(CONFIG).read()
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef))
    lines = source.splitlines()
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            assert "#" in lines[node.lineno - 1], f"no comment: {lines[node.lineno - 1]}"


def test_bad_format_is_named(tmp_path):
    c = _get_config()
    c.data.format = "text"
    with pytest.raises(fft.config_lib.ConfigError, match="data.format"):
        main.run(c, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Smoke runs
# ---------------------------------------------------------------------------------------------


def test_smoke_run_writes_results_and_resumes(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    config = _get_config()
    with config.unlocked():
        config.steps, config.checkpoint_every = 4, 2
        config.instruction.eval_examples = 8
    results = main.run(config, workdir)
    on_disk = json.loads(open(os.path.join(workdir, "results.json")).read())
    assert on_disk["method"] == "instruction" and on_disk["steps"] == 4
    for split in ("before", "after"):
        keys = set(on_disk[split])
        assert {"exact_match", "loss", "ppl"} <= keys
        assert any(k.startswith("exact_match/") for k in keys)
        assert 0.0 <= on_disk[split]["exact_match"] <= 1.0
    assert results["after"]["loss"] < results["before"]["loss"]
    assert on_disk["cost"]["trainable_params"] == on_disk["cost"]["total_params"]
    samples = [json.loads(x) for x in open(os.path.join(workdir, "samples.jsonl"))]
    assert {s["step"] for s in samples} == {0, 4}
    # A second call with more steps resumes from the checkpoint instead of starting over.
    config = _get_config()
    with config.unlocked():
        config.steps, config.checkpoint_every = 6, 2
        config.instruction.eval_examples = 8
    capsys.readouterr()
    results = main.run(config, workdir)
    assert "Resuming from checkpoint at step 4" in capsys.readouterr().out
    assert results["steps"] == 6
    assert results["before"] == on_disk["before"]  # the start's eval is kept, not redone


def test_hf_model_dir_with_chat_template_and_user_jsonl(tmp_path, micro_dir):
    hf_dir = str(tmp_path / "hf")
    fft.export(micro_dir, hf_dir, format="hf")
    # An HF-style chat template in tokenizer_config.json: the run must use it.
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    cfg_path = os.path.join(hf_dir, "tokenizer_config.json")
    tok_cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    json.dump({**tok_cfg, "chat_template": template}, open(cfg_path, "w"))
    dialogs = [
        {
            "messages": [
                {"role": "user", "content": f"Say {w}."},
                {"role": "assistant", "content": w},
            ]
        }
        for w in ("red", "blue", "green", "cat", "dog", "sun")
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in dialogs))
    config = _get_config()
    with config.unlocked():
        config.init_from = hf_dir
        config.steps, config.checkpoint_every = 2, 0
        config.data.format = "chat"
        config.data.train = str(data)
        config.data.eval = str(data)
        config.instruction.eval_examples = 4
    workdir = str(tmp_path / "w")
    results = main.run(config, workdir)
    assert results["steps"] == 2 and "exact_match" in results["after"]
    samples = [json.loads(x) for x in open(os.path.join(workdir, "samples.jsonl"))]
    # Rendered with the model's template; its final space is generated with the answer.
    assert samples[0]["prompt"].endswith("[assistant]")
