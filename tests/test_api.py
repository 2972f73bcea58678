"""The public API takes paths as `str` or `os.PathLike` and names what the caller gave in its
errors: `fft.load`, `fft.export`, `fft.zoo.resolve`, the HF/PEFT interop, `fft.pretrained`,
`fft.checkpoint.load_state`, `fft.report` and `fft.label` file readers."""

import pathlib

import numpy as np
import pytest
from flax import nnx

import fft
from fft import checkpoint, config_lib, label, pretrained, report, zoo
from fft.interop import hf, peft
from fft.models import lora


@pytest.fixture(scope="module")
def micro() -> pathlib.Path:
    return pathlib.Path(zoo.resolve("fft:micro"))


def _logits(model):
    tokens = np.arange(1, 9, dtype=np.int32)[None]
    return np.asarray(model(tokens))


def test_load_export_and_hf_interop_take_pathlike(micro, tmp_path):
    assert zoo.resolve(micro) == str(micro)
    model, tok = fft.load(micro)
    want = _logits(model)
    out = fft.export(micro, tmp_path / "hf")
    assert pathlib.Path(out) == tmp_path / "hf"
    assert hf.read_hf_config(tmp_path / "hf")["vocab_size"] == model.cfg.vocab_size
    _, params = hf.load_hf(tmp_path / "hf")
    assert len(list(nnx.to_flat_state(params))) == len(list(nnx.to_flat_state(nnx.state(model))))
    again, _ = hf.load_hf_model(tmp_path / "hf")
    np.testing.assert_allclose(_logits(again), want, rtol=1e-5, atol=1e-5)
    hf.export_hf(model, model.cfg, tmp_path / "hf2", tokenizer=tok)
    via_load, _ = fft.load(tmp_path / "hf2")  # an HF directory given as a Path
    np.testing.assert_allclose(_logits(via_load), want, rtol=1e-5, atol=1e-5)
    # A model in memory, written to a Path.
    fft.export(model, tmp_path / "hf3", tokenizer=tok)
    assert (tmp_path / "hf3" / "config.json").exists()


def test_pretrained_and_checkpoint_take_pathlike(micro):
    spec = pretrained.load_spec(micro)
    assert pretrained.kind_of(micro) == "fft"
    assert pretrained.latest_checkpoint(micro).startswith(str(micro))
    raw = pretrained.read_raw_params(micro)
    assert pretrained.read_fft_params(micro).keys() == raw.keys()
    from fft.models.transformer import Transformer

    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(spec.model_config, rngs=nnx.Rngs(0))))
    state = checkpoint.load_state(micro, abstract)
    assert len(list(nnx.to_flat_state(state))) == len(raw)


def test_peft_export_and_import_take_pathlike(micro, tmp_path):
    model, _ = fft.load(micro)
    lora.apply_lora(model, rank=2, alpha=4.0, targets=("q", "v"), rngs=nnx.Rngs(1))
    lin = model.layers[0].attn.q
    lin.lora_b[...] = lin.lora_b[...] + 0.5
    peft.export_peft(nnx.state(model), model.cfg, {"rank": 2, "alpha": 4.0}, tmp_path / "ad")
    fresh, _ = fft.load(str(micro))
    peft.import_peft(tmp_path / "ad", fresh)
    np.testing.assert_allclose(_logits(fresh), _logits(model), rtol=1e-5, atol=1e-5)


def test_report_and_label_files_take_pathlike(micro, tmp_path):
    assert report.read_results(micro)["method"]
    assert report.read_metrics(micro)
    html = report.build_report([micro], out=tmp_path / "r.html")
    assert pathlib.Path(html).exists()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    assert label.load_prompts(prompts) == ["hi"]
    rankings = tmp_path / "r.jsonl"
    assert label.read_rankings(rankings) == []
    assert label.summarize([rankings])["labelers"] == {}


def test_load_errors_name_the_argument_given(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(config_lib.FFTError) as e:
        fft.load(str(missing))
    assert str(e.value).startswith(f"fft.load({str(missing)!r}): no such file or directory")
    assert "config.init_from" not in str(e.value)
    with pytest.raises(config_lib.FFTError) as e:
        fft.load("fft:no-such-preset")
    assert str(e.value).startswith("fft.load('fft:no-such-preset'): unknown preset")
    with pytest.raises(config_lib.FFTError) as e:
        fft.export(missing, tmp_path / "out")
    assert str(e.value).startswith(f"fft.export({str(missing)!r}):")
    # The main job's path still names the config key it reads.
    with pytest.raises(config_lib.FFTError) as e:
        zoo.resolve(str(missing))
    assert str(e.value).startswith(f"config.init_from={str(missing)!r}: no such file")
    with pytest.raises(config_lib.FFTError) as e:
        fft.load("pip:fft-no-such-package")
    assert str(e.value).startswith("fft.load('pip:fft-no-such-package'): the package is not")


def test_public_functions_are_plain_functions(micro, tmp_path):
    """`fft.generate` / `fft.export` are the functions themselves (real signatures for `help`),
    also after the CLI module `fft.export` and the sampler module `fft.sampling` are imported."""
    import importlib
    import inspect

    from fft import api, sampling

    export_cli = importlib.import_module("fft.export")
    importlib.import_module("fft.sampling")
    assert fft.generate is sampling.generate and fft.export is api.export
    assert callable(export_cli.main) and export_cli is not fft.export
    gen_params = list(inspect.signature(fft.generate).parameters)
    assert gen_params[:4] == ["model", "tokenizer", "prompts", "max_new_tokens"]
    assert {"temperature", "top_k", "top_p", "seed", "stop_at_eos"} <= set(gen_params)
    export_params = list(inspect.signature(fft.export).parameters)
    assert export_params[:4] == ["workdir_or_model", "out_dir", "format", "merge"]
    for f in (fft.load, fft.generate, fft.export):
        assert inspect.isfunction(f) and "Args:" in f.__doc__ and "Returns:" in f.__doc__
    out = fft.export(micro, tmp_path / "hf")
    assert (pathlib.Path(out) / "config.json").exists()
    model, tok = fft.load(micro)
    assert len(fft.generate(model, tok, ["the"], max_new_tokens=2)) == 1
