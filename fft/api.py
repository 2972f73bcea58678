"""The Python API: `fft.load`, `fft.generate`, `fft.export`."""

from __future__ import annotations

import json
import os

from flax import nnx

from fft import pretrained, zoo
from fft.config_lib import FFTError
from fft.interop import hf
from fft.models.config import ModelConfig
from fft.sampling import generate  # noqa: F401  (re-exported as fft.generate)


def load(source: str | os.PathLike):
    """Loads a model for inference.

    Args:
      source: a preset (`'fft:tiny'`), a local HF model directory, or an fft workdir (then its
        latest checkpoint, LoRA merged); a str or an os.PathLike.

    Returns:
      (model, tokenizer): an NNX decoder (or encoder) and its tokenizer.
    """
    source = os.fspath(source) if source else ""
    path = zoo.resolve(source, what=f"fft.load({source!r})")
    if not path:
        raise FFTError("fft.load needs a source: 'fft:tiny', an HF directory or an fft workdir.")
    spec = pretrained.load_spec(path)
    return build_loaded(spec.model_config, spec.load_weights), spec.tokenizer


def build_loaded(model_config: ModelConfig, load_weights):
    """A model of `model_config` with every weight `load_weights` provides."""
    abstract = hf.build_abstract(model_config)  # Transformer, or Encoder for BERT configs
    graphdef, abstract_state = nnx.split(abstract)
    state = load_weights(abstract_state, None)
    missing = {p for p, _ in nnx.to_flat_state(abstract_state)} - {
        p for p, _ in nnx.to_flat_state(state)
    }
    if missing:
        names = sorted(".".join(map(str, p)) for p in missing)[:5]
        raise FFTError(f"checkpoint lacks weights the model needs: {', '.join(names)} ...")
    return nnx.merge(graphdef, state)


def export(
    workdir_or_model,
    out_dir: str | os.PathLike,
    format: str = "hf",
    merge: bool = False,
    tokenizer=None,
    quant: str = "f16",
):
    """Writes a HuggingFace model directory, a PEFT adapter or a llama.cpp `.gguf` file.

    Args:
      workdir_or_model: an fft workdir (str or os.PathLike), or an in-memory decoder (then
        pass `tokenizer`).
      out_dir: directory to create (str or os.PathLike); for format='gguf', the file to write.
      format: 'hf' (config.json + model.safetensors + tokenizer), 'peft' (LoRA adapter only)
        or 'gguf' (one file: weights, config and tokenizer; LoRA folded in).
      merge: for a LoRA run with format='hf', fold the adapters into the base weights (always
        done for 'hf' and 'gguf'; kept for API symmetry) — with format='peft' it is an error.
      tokenizer: the tokenizer of an in-memory model (a workdir brings its own).
      quant: format='gguf' only: 'f16', 'q8_0' or 'f32' storage of the matrices.

    Returns:
      out_dir.
    """
    from fft.interop import peft

    if format not in ("hf", "peft", "gguf"):
        raise FFTError(f"export format={format!r}: choose 'hf', 'peft' or 'gguf'.")
    out_dir = os.fspath(out_dir)
    if isinstance(workdir_or_model, str | os.PathLike):
        source = os.fspath(workdir_or_model)
        workdir = zoo.resolve(source, what=f"fft.export({source!r})")
        spec = pretrained.load_spec(workdir)
        tokenizer = spec.tokenizer
        if format == "peft":
            if merge:
                raise FFTError("--merge folds adapters into the base; use --format=hf for that.")
            with open(os.path.join(workdir, "config.json")) as f:
                run_config = json.load(f)
            if not run_config.get("lora", {}).get("rank"):
                raise FFTError(f"{workdir} was not a LoRA run (lora.rank=0): nothing to export.")
            raw = pretrained.read_raw_params(workdir)
            peft.export_peft(
                raw,
                spec.model_config,
                run_config["lora"],
                out_dir,
                base_model_name_or_path=run_config.get("init_from", ""),
            )
            return out_dir
        model = build_loaded(spec.model_config, spec.load_weights)
        model_config = spec.model_config
    else:
        model = workdir_or_model
        model_config = model.cfg
    if format == "gguf":
        from fft.interop import gguf_export

        return gguf_export.write_gguf(model, model_config, out_dir, tokenizer, quant=quant)
    hf.export_hf(model, model_config, out_dir, tokenizer=tokenizer)
    return out_dir
