"""Starting weights (`fft.pretrained`): LoRA folding of scan-stacked adapters, loading across
`scan_layers` layouts both ways, and partial loads that are loud: a backbone weight the source
lacks is an error naming it; LoRA adapters, new heads and new vocabulary rows stay fresh and
are counted in the log."""

import json
import logging
import pathlib

import numpy as np
import pytest
from flax import nnx

import fft
from fft import config_lib, main, pretrained, zoo
from fft.interop import hf
from fft.methods import transfer
from fft.models import lora
from fft.models.heads import ClassificationHead, SequenceClassifier
from fft.models.presets import get_preset
from fft.models.transformer import Transformer
from fft.rl import rewards

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _abstract(cfg, *, lora_rank=0, head=None):
    """Abstract state of a Transformer of `cfg` (+ LoRA, + a reward head) or a classifier."""

    def build():
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        if lora_rank:
            lora.apply_lora(model, rank=lora_rank, alpha=8.0, rngs=nnx.Rngs(1))
        if head == "reward":
            rewards.attach_reward_head(model, nnx.Rngs(2))
        if head == "classifier":
            model = SequenceClassifier(model, ClassificationHead(cfg.d_model, 3, rngs=nnx.Rngs(2)))
        return model

    return nnx.state(nnx.eval_shape(build))


@pytest.fixture(scope="module")
def micro() -> str:
    return zoo.resolve("fft:micro")


def _instruction_config(steps: int, rank: int, scan_layers: bool, init_from: str = ""):
    config = config_lib.load_config(str(ROOT / "configs" / "instruction.py"), "smoke")
    with config.unlocked():
        config.steps, config.checkpoint_every = steps, max(steps, 1)
        config.lora.rank, config.lora.alpha = rank, 8.0
        config.model.scan_layers = scan_layers
        config.instruction.eval_examples = config.instruction.eval_batch_size = 4
        config.instruction.max_new_tokens = 2
        config.init_from = init_from or config.init_from
    return config


@pytest.fixture(scope="module")
def lora_scan_run(tmp_path_factory) -> pathlib.Path:
    """A LoRA run with scan_layers=True (stacked adapters [L, in, r] x [L, r, out]), 2 steps."""
    workdir = tmp_path_factory.mktemp("lora_scan")
    main.run(_instruction_config(2, 4, True), str(workdir))
    return workdir


# ---------------------------------------------------------------------------------------------
# Item: one LoRA fold, plain and scan-stacked
# ---------------------------------------------------------------------------------------------


def _per_layer_fold(raw: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Reference: stacked kernels folded layer by layer with the textbook tensordot."""
    out = {k: v for k, v in raw.items() if not k.endswith(("lora_a", "lora_b"))}
    for name in [k for k in raw if k.endswith(".lora_a")]:
        base = name[: -len(".lora_a")]
        a, b = raw[name], raw[base + ".lora_b"]
        kernel = raw[base + ".kernel"]
        out[base + ".kernel"] = np.stack(
            [k + np.tensordot(x, y, axes=1) * scale for k, x, y in zip(kernel, a, b, strict=True)]
        )
    return out


def test_fold_lora_of_stacked_adapters_equals_per_layer_fold():
    rng = np.random.default_rng(0)
    raw = {
        "layers.attn.q.kernel": rng.normal(size=(3, 8, 2, 4)).astype(np.float32),  # [L,in,h,dh]
        "layers.attn.q.lora_a": rng.normal(size=(3, 8, 2)).astype(np.float32),
        "layers.attn.q.lora_b": rng.normal(size=(3, 2, 2, 4)).astype(np.float32),
        "layers.attn.o.kernel": rng.normal(size=(3, 2, 4, 8)).astype(np.float32),  # [L,h,dh,d]
        "layers.attn.o.lora_a": rng.normal(size=(3, 2, 4, 2)).astype(np.float32),
        "layers.attn.o.lora_b": rng.normal(size=(3, 2, 8)).astype(np.float32),
        "embed.embedding": rng.normal(size=(5, 8)).astype(np.float32),
    }
    want = _per_layer_fold(raw, 0.5)
    got = pretrained.fold_lora(raw, 0.5)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    # The HF export folds with the same helper.
    exported = hf._params_to_export(raw, 0.5)
    for k in want:
        np.testing.assert_allclose(exported[tuple(k.split("."))], want[k], rtol=1e-5, atol=1e-5)
    # A plain (per-layer) pair still folds, and a pair that does not fit is named.
    plain = {"q.kernel": raw["layers.attn.q.kernel"][0], "q.lora_a": raw["layers.attn.q.lora_a"][0],
             "q.lora_b": raw["layers.attn.q.lora_b"][0]}  # fmt: skip
    np.testing.assert_allclose(
        pretrained.fold_lora(plain, 0.5)["q.kernel"], want["layers.attn.q.kernel"][0], rtol=1e-5
    )
    with pytest.raises(config_lib.FFTError, match="do not fit"):
        pretrained.fold_adapter(np.zeros((8, 9)), np.zeros((8, 2)), np.zeros((2, 8)), 1.0)


def test_lora_scan_run_loads_folded(lora_scan_run):
    raw = pretrained.read_raw_params(lora_scan_run)
    assert raw["layers.attn.q.lora_a"].ndim == 3  # stacked adapters indeed
    want = _per_layer_fold(raw, 8.0 / 4)
    model, _ = fft.load(lora_scan_run)  # a pathlib.Path, too
    got = _flat(nnx.state(model))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert np.abs(want["layers.attn.q.kernel"] - raw["layers.attn.q.kernel"]).max() > 0


def test_lora_scan_run_inits_per_layer_models(lora_scan_run, caplog):
    """init_from a scan-stacked LoRA run into a per-layer model: every backbone weight arrives
    (the run's own decoder, a reward model, a classifier backbone)."""
    spec = pretrained.load_spec(lora_scan_run)
    want = _per_layer_fold(pretrained.read_raw_params(lora_scan_run), 2.0)
    per_layer = spec.model_config.replace(scan_layers=False)
    with caplog.at_level(logging.INFO, logger="fft.pretrained"):
        got = _flat(spec.load_weights(_abstract(per_layer, lora_rank=2, head="reward")))
    assert not any("lora" in k or "reward_head" in k for k in got)
    np.testing.assert_array_equal(got["layers.1.mlp.up.kernel"], want["layers.mlp.up.kernel"][1])
    assert len(got) == 3 + 9 * per_layer.n_layers  # embed, final_norm, lm_head + 9 per layer
    assert "fresh init kept for 28 LoRA adapters" in caplog.text
    assert "2 new heads (reward_head.out.bias, reward_head.out.kernel)" in caplog.text
    # transfer's classifier loader, through the same place()
    loader = transfer.backbone_loader(spec, str(lora_scan_run))
    got = _flat(loader(_abstract(per_layer, head="classifier")))
    np.testing.assert_array_equal(
        got["backbone.layers.0.attn.q.kernel"], want["layers.attn.q.kernel"][0]
    )
    assert not any(k.startswith("head.") for k in got)


def test_main_job_init_from_a_scan_lora_run_starts_where_it_ended(lora_scan_run, tmp_path):
    """The train loop's sharded load: a per-layer LoRA run from the stacked LoRA run starts with
    the loss that run ended with (a random backbone would not)."""
    source = json.loads((lora_scan_run / "results.json").read_text())
    config = _instruction_config(1, 2, False, init_from=str(lora_scan_run))
    results = main.run(config, str(tmp_path / "w"))
    assert results["before"]["loss"] == pytest.approx(source["after"]["loss"], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Item: scan layouts both ways, and no silent partial load
# ---------------------------------------------------------------------------------------------


def test_place_maps_per_layer_and_stacked_names_both_ways(micro):
    spec = pretrained.load_spec(micro)
    cfg = spec.model_config
    assert not cfg.scan_layers  # fft:micro is saved per layer
    src = pretrained.read_fft_params(micro)
    stacked = _flat(spec.load_weights(_abstract(cfg.replace(scan_layers=True))))
    assert set(stacked) == set(_flat(_abstract(cfg.replace(scan_layers=True))))
    np.testing.assert_array_equal(stacked["layers.attn.k.kernel"][1], src["layers.1.attn.k.kernel"])
    back = _flat(pretrained.place(stacked, _abstract(cfg), model_config=cfg))
    assert back.keys() == src.keys()
    for k in src:
        np.testing.assert_array_equal(back[k], src[k])


def test_missing_backbone_weights_are_an_error_naming_them(micro, tmp_path):
    spec = pretrained.load_spec(micro)
    cfg = spec.model_config
    with pytest.raises(config_lib.FFTError, match=r"layers\.2\.attn\.q\.kernel") as e:
        spec.load_weights(_abstract(cfg.replace(n_layers=3)))
    assert micro in str(e.value) and "lacks 9 weights" in str(e.value)
    with pytest.raises(config_lib.FFTError, match=r"layers\.0\.mlp\.up\.kernel: \(64, 128\)"):
        spec.load_weights(_abstract(cfg.replace(d_ff=96)))
    # The same check guards HuggingFace sources.
    fft.export(micro, tmp_path / "hf")
    hf_spec = pretrained.load_spec(tmp_path / "hf")
    with pytest.raises(config_lib.FFTError, match=r"layers\.2\.mlp\.down\.kernel"):
        hf_spec.load_weights(_abstract(hf_spec.model_config.replace(n_layers=3)))
    assert len(_flat(hf_spec.load_weights(_abstract(hf_spec.model_config)))) == 21


def test_new_vocabulary_rows_keep_the_old_ones(micro, caplog):
    spec = pretrained.load_spec(micro)
    src = pretrained.read_fft_params(micro)
    old = spec.model_config.vocab_size
    with caplog.at_level(logging.INFO, logger="fft.pretrained"):
        got = _flat(spec.load_weights(_abstract(spec.model_config.replace(vocab_size=old + 88))))
    np.testing.assert_array_equal(got["embed.embedding"][:old], src["embed.embedding"])
    np.testing.assert_array_equal(got["lm_head.kernel"][:, :old], src["lm_head.kernel"])
    np.testing.assert_allclose(
        got["embed.embedding"][old:], np.broadcast_to(src["embed.embedding"].mean(0), (88, 64)),
        rtol=1e-6,
    )  # fmt: skip
    assert "embed.embedding (+88 rows)" in caplog.text


# ---------------------------------------------------------------------------------------------
# Item (issue 17 #9): padded vocabularies load, export cut back, and old model.json files load
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory) -> pathlib.Path:
    """fft:micro's recipe from scratch with a 330-piece tokenizer (padded to 384 rows), 2 steps."""
    config = config_lib.pretrain_config("micro")
    config.pretrain.vocab_size, config.pretrain.train_docs, config.pretrain.eval_docs = 330, 300, 8
    config.steps, config.checkpoint_every, config.log_every = 2, 2, 1
    workdir = tmp_path_factory.mktemp("padded")
    main.run(config, str(workdir))
    return workdir


def test_padded_run_loads_masked_and_exports_the_real_rows(padded_run, tmp_path):
    from safetensors import safe_open

    model, tokenizer = fft.load(padded_run)
    n = tokenizer.vocab_size
    model_json = json.loads((padded_run / "model.json").read_text())
    assert 256 < n <= 330 and (model_json["vocab_size"], model_json["real_vocab_size"]) == (384, n)
    assert model.embed.embedding[...].shape[0] == 384 and model.cfg.n_tokens == n
    logits = np.asarray(model(np.asarray([tokenizer.encode("the river")], np.int32)))
    assert logits.shape[-1] == 384 and logits[..., n:].max() < -1e8
    fft.export(padded_run, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == n
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "np") as f:
        assert f.get_tensor("model.embed_tokens.weight").shape == (n, 64)
        assert f.get_tensor("lm_head.weight").shape == (n, 64)
    back, _ = fft.load(tmp_path / "hf")  # HF models keep their own (unpadded) vocabulary
    np.testing.assert_allclose(
        np.asarray(back(np.asarray([tokenizer.encode("the river")], np.int32))),
        logits[..., :n],
        atol=1e-5,
    )
    pytest.importorskip("gguf")
    fft.export(padded_run, tmp_path / "m.gguf", format="gguf", quant="f32")
    back, _ = fft.load(tmp_path / "m.gguf")  # GGUF too holds the real rows only
    assert back.embed.embedding[...].shape[0] == n
    np.testing.assert_allclose(
        np.asarray(back(np.asarray([tokenizer.encode("the river")], np.int32))),
        logits[..., :n],
        atol=1e-5,
    )


def test_old_model_json_without_real_vocab_size_loads(micro, tmp_path):
    """A model.json written before `real_vocab_size` existed (fft:micro's cache) loads, all
    rows real; a model config without padding writes model.json without the field."""
    raw = json.loads((pathlib.Path(micro) / "model.json").read_text())
    assert "real_vocab_size" not in raw
    cfg = pretrained.load_spec(micro).model_config
    assert (cfg.vocab_size, cfg.real_vocab_size, cfg.n_tokens) == (512, 0, 512)
    assert "real_vocab_size" not in cfg.to_dict()
    padded = cfg.with_vocab(300)
    assert padded.to_dict()["real_vocab_size"] == 300
    assert type(cfg).from_dict(padded.to_dict()) == padded


def test_init_from_an_unpadded_fft_workdir_pads_its_vocabulary(monkeypatch):
    """An fft model of 330 rows (built before padding) is padded to 384 when a run starts from
    it: the old rows are kept, the padding rows are their mean, the logits masked."""
    from fft.train import lm

    cfg = get_preset("micro").replace(vocab_size=330)
    src = _flat(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
    spec = pretrained.Spec(
        cfg, None, lambda a, s=None: pretrained.place(src, a, s, model_config=cfg), kind="fft"
    )
    monkeypatch.setattr(pretrained, "load_spec", lambda path: spec)
    config = config_lib.base_config()
    base = lm.load_base(config)
    assert (base.model_config.vocab_size, base.model_config.n_tokens) == (384, 330)
    got = _flat(base.load_weights(_abstract(base.model_config)))
    for name, axis in (("embed.embedding", 0), ("lm_head.kernel", 1)):
        new, old = np.moveaxis(got[name], axis, 0), np.moveaxis(src[name], axis, 0)
        np.testing.assert_array_equal(new[:330], old)
        np.testing.assert_allclose(new[330:], np.broadcast_to(old.mean(0), new[330:].shape), 1e-6)
