"""fft.bench: every subcommand runs on micro settings and prints valid JSON lines.

Functional only: no timing is asserted (the figures of a loaded CI machine mean nothing).
"""

import json
import math
import os
import subprocess
import sys

import pytest

from fft import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ["--tokenizer_docs=200"]

CASES = {
    "train": (
        ["train", "--preset=micro", "--seq=32", "--batch=2", "--steps=2", "--peak_n=256"],
        {"matmul_f32_gflops", "params", "compile_s", "train_tokens_per_s", "mfu",
         "peak_memory_bytes"},
    ),
    "generate": (
        ["generate", "--preset=micro", "--batch=2", "--prompt=8", "--new=4", "--reps=2"],
        {"params", "generate_tokens_per_s", "compile_s", "peak_memory_bytes"},
    ),
    "memory": (
        ["memory", "--preset=micro", "--lora_rank=4"],
        {"params", "optimizer_state_bytes", "lora_vs_full_optimizer_state",
         "params_plus_optimizer_bytes", "qlora_nf4_block_kernels_vs_f32"},
    ),
    "loader": (
        ["loader", "--preset=micro", "--seq=32", "--batch=2", "--docs=200",
         "--loader_seconds=0.2", "--steps=1", *TOK],
        {"loader_tokens_per_s", "train_tokens_per_s", "loader_vs_train"},
    ),
    "ppo": (
        ["ppo", "--preset=micro", "--rollout_batch=4", "--batch=2", "--epochs=1",
         "--prompt=16", "--new=4", "--iters=2", *TOK],
        {"params", "ppo_iteration_s", "ppo_time_split"},
    ),
    "grpo": (
        ["grpo", "--preset=micro", "--rollout_batch=4", "--group_size=2", "--batch=2",
         "--epochs=1", "--prompt=16", "--new=4", "--lora_rank=2", "--iters=2", *TOK],
        {"params", "grpo_iteration_s", "grpo_time_split"},
    ),
    "packing": (
        ["packing", "--preset=micro", "--seq=64", "--batch=2", "--steps=1", "--rounds=1",
         "--records=40", *TOK],
        {"train_target_tokens_per_s", "speedup_packing_vs_padding"},
    ),
}  # fmt: skip


def _lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        d = json.loads(line)  # stdout holds JSON lines only
        assert {"metric", "value", "unit"} <= set(d), d
        assert d["value"] is None or isinstance(d["value"], (int, float)), d
        if isinstance(d["value"], float):
            assert math.isfinite(d["value"]), d
        out.append(d)
    return out


@pytest.mark.parametrize("what", list(CASES))
def test_subcommand_prints_json_lines(what, capsys):
    argv, want = CASES[what]
    assert bench.main(argv) == 0
    lines = _lines(capsys.readouterr().out)
    assert want <= {d["metric"] for d in lines}
    assert all(d["bench"] == what and d["framework"] in ("fft", "transformers") for d in lines)
    if what == "memory":
        ratio = next(d for d in lines if d["metric"] == "lora_vs_full_optimizer_state")
        assert 0 < ratio["value"] < 1
        _check_memory(lines)
    if what == "grpo":
        _check_grpo(lines)
    if what == "train":
        tps = next(d for d in lines if d["metric"] == "train_tokens_per_s")
        assert tps["preset"] == "micro" and tps["seq_len"] == 32 and tps["batch"] == 2
        assert tps["value"] > 0 and math.isfinite(tps["loss"])


def _check_grpo(lines):
    """`fft.bench grpo`: one line per iteration (the first with compile), the split of the
    steady iteration into generation + preparation + training, and both throughputs > 0."""
    its = [d for d in lines if d["metric"] == "grpo_iteration_s"]
    assert [d["iteration"] for d in its] == [0, 1] and its[0]["includes_compile"]
    for d in its:
        assert d["generation_s"] > 0 and d["training_s"] > 0
        assert d["generation_s"] + d["prepare_s"] + d["training_s"] <= d["value"] + 1e-6
        assert 0 < d["response_len"] <= 4 and d["algo"] == "grpo" and d["group_size"] == 2
    split = next(d for d in lines if d["metric"] == "grpo_time_split")
    assert split["value"] == pytest.approx(split["generation_s"] / split["iteration_s"])
    assert 0 < split["value"] < 1 and split["iterations"] == 1
    assert split["generation_tokens_per_s"] > 0 and split["training_tokens_per_s"] > 0
    assert split["init_from"] == "random:micro"


def _check_memory(lines):
    """`fft.bench memory`: the five modes in order, params + optimizer bytes falling down the
    list, and nf4 block kernels at 1/8 of f32 plus their scales (micro: one f32 scale per
    block of 64, or of 16 for the `o` projection's head_dim)."""
    from fft.bench.memory import MODES

    totals = [d for d in lines if d["metric"] == "params_plus_optimizer_bytes"]
    assert [d["mode"] for d in totals] == list(MODES) == [
        "full_f32", "full_bf16_params", "lora", "qlora_int8", "qlora_nf4"]  # fmt: skip
    values = [d["value"] for d in totals]
    assert values == sorted(values, reverse=True) and len(set(values)) == 5
    params = {d["mode"]: d["value"] for d in lines if d["metric"] == "params"}
    assert len(set(params.values())) == 2  # full == bf16; the LoRA runs add the same adapters
    nf4 = next(d for d in lines if d["metric"] == "qlora_nf4_block_kernels_vs_f32")["value"]
    int8 = next(d for d in lines if d["metric"] == "qlora_int8_block_kernels_vs_f32")["value"]
    assert 1 / 8 < nf4 < 1 / 8 + 1 / 16 + 1e-9 and 1 / 4 < int8 < 1 / 4 + 1 / 16 + 1e-9


def test_vs_transformers(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    argv = ["train", "--preset=micro", "--seq=16", "--batch=1", "--steps=1", "--rounds=1",
            "--vs=transformers", "--peer_threads=1", "--peak_n=256"]  # fmt: skip
    assert bench.main(argv) == 0
    lines = _lines(capsys.readouterr().out)
    peer = [d for d in lines if d.get("framework") == "transformers"]
    assert peer and peer[0]["metric"] == "train_tokens_per_s"
    assert peer[0]["params"] == next(d for d in lines if d["metric"] == "params")["value"]
    assert "speedup_vs_transformers" in {d["metric"] for d in lines}


def test_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "fft.bench", "memory", "--preset=micro"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    assert "lora_vs_full_optimizer_state" in {d["metric"] for d in _lines(out)}


def test_init_from_and_lora_vs_peft(capsys):
    """`--init_from` (an fft workdir here; 'smollm2-135m-instruct' in docs/performance.md) sets
    the architecture of both sides; `--lora_rank` trains fft LoRA against peft LoRA of the same
    rank on the same targets: equal trainable and total parameter counts."""
    pytest.importorskip("peft")
    from fft import pretrained, zoo

    micro = zoo.resolve("fft:micro")
    cfg = pretrained.load_spec(micro).model_config
    argv = ["train", f"--init_from={micro}", "--seq=16", "--batch=1", "--steps=1",
            "--rounds=1", "--vs=transformers", "--peer_threads=1", "--peak_n=256",
            "--lora_rank=4"]  # fmt: skip
    assert bench.main(argv) == 0
    lines = _lines(capsys.readouterr().out)
    params = next(d for d in lines if d["metric"] == "params")
    assert params["init_from"] == micro and params["lora_rank"] == 4 and "preset" not in params
    peer = next(d for d in lines if d.get("framework") == "transformers")
    assert peer["peer_lora_rank"] == 4
    # r * (d_in + d_out) per target, 7 targets per layer, as fft.models.lora.DEFAULT_TARGETS.
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    d, f = cfg.d_model, cfg.d_ff
    per_layer = 4 * ((d + q) * 2 + (d + kv) * 2 + (d + f) * 3)
    assert params["trainable"] == peer["trainable"] == cfg.n_layers * per_layer
    assert params["value"] == peer["params"]
    assert "speedup_vs_transformers" in {d["metric"] for d in lines}
