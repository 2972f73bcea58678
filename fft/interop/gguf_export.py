"""fft params -> a llama.cpp `.gguf` file (f32, f16 or q8_0), written with `gguf.GGUFWriter`.

The tensors are the HF export's (`hf.hf_tensors`: LoRA folded, HF `[out, in]` layout) renamed
by the `gguf` package's name table, with Q/K rows put back into llama.cpp's order for Llama-
family models (`gguf.permute_qk`) and gemma norms stored as `1 + w` (`gguf.norm_shift`).
Norms and biases stay f32, as llama.cpp's converter keeps 1-D tensors; q8_0 falls back to f16
for a matrix whose rows are not whole 32-value blocks.
The tokenizer goes in as llama.cpp's metadata (`gguf_tokenizer.write`), so llama.cpp, Ollama
and transformers (`from_pretrained(dir, gguf_file=...)`) all read the file.
"""

from __future__ import annotations

import os

import numpy as np

from fft.config_lib import FFTError
from fft.interop import gguf as gguf_in
from fft.interop import gguf_tokenizer, hf

QUANTS = ("f16", "q8_0", "f32")


def _qtype(quant: str, arr: np.ndarray):
    """The ggml type one tensor is stored in under `quant`."""
    from gguf import GGMLQuantizationType as T
    from gguf.constants import GGML_QUANT_SIZES

    if arr.ndim < 2 or quant == "f32":
        return T.F32
    if quant == "q8_0" and arr.shape[-1] % GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return T.Q8_0
    return T.F16


def write_gguf(
    model_or_state,
    model_config,
    out_path: str | os.PathLike,
    tokenizer=None,
    *,
    quant: str = "f16",
    name: str = "fft model",
    lora_scale: float | None = None,
) -> str:
    """Writes an fft decoder as a `.gguf` file.

    Args:
      model_or_state: an fft Transformer, its param nnx.State, or a flat
        `{'layers.0.attn.q.kernel': array}` dict (LoRA adapters are folded in).
      model_config: its ModelConfig; family llama, qwen2, qwen3 or gemma3_text.
      out_path: the file to write (its directory is created).
      tokenizer: the fft tokenizer to store (byte-level BPE or sentencepiece); None writes a
        file without one, which llama.cpp cannot run.
      quant: 'f16' (default), 'q8_0' or 'f32' for the matrices; 1-D tensors are always f32.
      name: `general.name` in the metadata.
      lora_scale: the adapters' scale when a state/dict (not a module) carries LoRA leaves.

    Returns:
      out_path as a str.

    Raises:
      FFTError for another family, an unknown `quant`, or a tokenizer GGUF cannot hold.
    """
    import gguf
    from gguf.quants import quantize

    if quant not in QUANTS:
        raise FFTError(f"GGUF quant={quant!r}: choose one of {', '.join(QUANTS)}")
    cfg = hf.real_config(model_config)  # padding rows (masked in fft) are not written
    arch = gguf_in.gguf_arch(cfg.family)
    gguf_in.check_supported(arch, "the model to export")
    # llama.cpp wires each architecture as HF's class of that name does: the same check.
    hf.config_to_hf(cfg)
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    names = gguf_in.tensor_names(cfg)
    writer = gguf.GGUFWriter(out_path, arch)
    _write_config(writer, cfg, name, quant)
    if tokenizer is not None:
        gguf_tokenizer.write(writer, tokenizer)
    for hf_name, arr in hf.hf_tensors(model_or_state, model_config, lora_scale=lora_scale):
        arr = arr.astype(np.float32)
        heads = gguf_in.qk_heads(cfg, hf_name)
        if heads is not None:
            arr = gguf_in.permute_qk(arr, heads)
        shift = gguf_in.norm_shift(cfg, hf_name)
        if shift:
            arr = arr + np.float32(shift)
        qtype = _qtype(quant, arr)
        writer.add_tensor(names[hf_name], quantize(arr, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _write_config(writer, cfg, name: str, quant: str) -> None:
    import gguf

    if cfg.rope_scaling:
        if cfg.rope_scaling.get("rope_type") != "linear":
            raise FFTError(f"GGUF export: rope scaling {cfg.rope_scaling} is not supported")
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}[quant]
    writer.add_name(name)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, file_type)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    if cfg.family == "gemma3_text":
        _check_gemma3_defaults(cfg)
        writer.add_sliding_window(int(cfg.sliding_window))


def _check_gemma3_defaults(cfg) -> None:
    """A gemma3 GGUF stores only the window: the rest must be what llama.cpp hard-codes."""
    want = gguf_in.config_from_gemma3_defaults(cfg)
    bad = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        raise FFTError(
            f"GGUF export: this gemma3 model has {bad}, but a gemma3 GGUF cannot store them "
            f"(llama.cpp assumes {want}); export it as HF instead (--format=hf)."
        )
