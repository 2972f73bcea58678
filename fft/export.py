"""`python -m fft.export --workdir=W --out=DIR [--format=hf|peft] [--merge]`.

Writes an fft run as a HuggingFace model directory (config.json, model.safetensors, tokenizer
files; LoRA folded into the weights) or, with --format=peft, its LoRA adapter in PEFT's format.
"""

from __future__ import annotations

import argparse
import sys

from fft.config_lib import FFTError


def main(argv: list[str] | None = None) -> int:
    """Parses flags, exports, prints the output directory; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m fft.export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="fft workdir (or HF dir / fft:<preset>)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--format", default="hf", choices=("hf", "peft"))
    p.add_argument("--merge", action="store_true", help="fold LoRA into the base (format hf)")
    args = p.parse_args(argv)
    from fft import api

    try:
        out = api.export(args.workdir, args.out, format=args.format, merge=args.merge)
    except FFTError as e:
        print(f"fft.export: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
