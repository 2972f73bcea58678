"""`python -m fft.export --workdir=W --out=DIR [--format=hf|peft|gguf] [--merge] [--quant=f16]`.

Writes an fft run as a HuggingFace model directory (config.json, model.safetensors, tokenizer
files; LoRA folded into the weights), with --format=peft its LoRA adapter in PEFT's format, or
with --format=gguf one llama.cpp file (--out=x.gguf; --quant=f16|q8_0|f32). This module is the
command line only; from Python call the function `fft.export(...)` (`fft.api.export`).
"""

from __future__ import annotations

import argparse
import sys

from fft.config_lib import FFTError


def main(argv: list[str] | None = None) -> int:
    """Parses flags, exports, prints the output directory; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m fft.export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="fft workdir (or HF dir / fft:<preset>)")
    p.add_argument("--out", required=True, help="directory to write (format gguf: the file)")
    p.add_argument("--format", default="hf", choices=("hf", "peft", "gguf"))
    p.add_argument("--merge", action="store_true", help="fold LoRA into the base (format hf)")
    p.add_argument("--quant", default="f16", choices=("f16", "q8_0", "f32"), help="format gguf")
    args = p.parse_args(argv)
    from fft import api

    try:
        out = api.export(
            args.workdir, args.out, format=args.format, merge=args.merge, quant=args.quant
        )
    except FFTError as e:
        print(f"fft.export: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
