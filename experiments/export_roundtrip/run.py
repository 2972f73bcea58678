"""Export round trip of the instruction-tuned SmolLM2 (issue 20 item 5): fft's greedy answers on
held-out prompts, against transformers loading the HF export (LoRA folded in) and peft loading
the PEFT adapter on top of SmolLM2 exported as an HF directory.

    python -m fft.main --config=configs/instruction.py:smollm2 --workdir=runs/instruction_smollm2
    python experiments/export_roundtrip/run.py --workdir=runs/instruction_smollm2 --n=30

Writes OUT/roundtrip.json (per prompt: fft's, transformers' and peft's answers, and whether the
token ids agree) and prints the agreement counts. The CI-sized version of this check (fft:micro,
a short LoRA run) is tests/interop/test_export_roundtrip.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import fft  # noqa: E402
from fft.data import formats  # noqa: E402
from fft.data.synthetic import World  # noqa: E402
from fft.sampling import generate_tokens, left_pad  # noqa: E402


def _until_stop(ids, stop: int) -> list[int]:
    """`ids` up to and including the first `stop` token."""
    ids = [int(t) for t in ids]
    return ids[: ids.index(stop) + 1] if stop in ids else ids


def fft_answers(model, prompts, pad: int, stop: int, n: int, batch: int = 16) -> list[list[int]]:
    """fft's batched KV-cache greedy generation, each row cut after its stop token."""
    out = []
    for i in range(0, len(prompts), batch):
        tokens, mask = left_pad(prompts[i : i + batch], pad)
        res = generate_tokens(model, tokens, mask, max_new_tokens=n, stop_tokens=(stop,))
        out += [_until_stop(row, stop) for row in np.asarray(res.tokens)]
    return out


def torch_answers(model, prompts, stop: int, n: int) -> list[list[int]]:
    """transformers' greedy `generate`, one prompt at a time (no padding), cut the same way."""
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=n, do_sample=False, eos_token_id=stop, pad_token_id=stop,
            )  # fmt: skip
            out.append(_until_stop(seq[0, len(ids) :].tolist(), stop))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the instruction-tuned LoRA run")
    p.add_argument("--out", default="", help="output folder (default: WORKDIR/roundtrip)")
    p.add_argument("--n", type=int, default=30, help="held-out prompts")
    p.add_argument("--new_tokens", type=int, default=24, help="greedy tokens per prompt")
    args = p.parse_args()
    import peft
    import transformers

    out = args.out or os.path.join(args.workdir, "roundtrip")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(args.workdir, "config.json")) as f:
        run = json.load(f)
    template = run["data"]["template"] or None
    records = World(run["instruction"]["world_seed"]).instruction_data("test", args.n)

    t0 = time.time()
    model, tok = fft.load(args.workdir)  # latest checkpoint, LoRA merged
    prompts = [formats.encode_prompt(r, "instruction", tok, template=template) for r in records]
    stop, pad = tok.eos_id, max(tok.pad_id, 0)
    ours = fft_answers(model, prompts, pad, stop, args.new_tokens)
    del model

    hf_dir = fft.export(args.workdir, os.path.join(out, "hf"), format="hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    theirs_hf = torch_answers(hf_model, prompts, stop, args.new_tokens)
    del hf_model

    base_dir = fft.export(run["init_from"], os.path.join(out, "base"), format="hf")
    adapter_dir = fft.export(args.workdir, os.path.join(out, "adapter"), format="peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    theirs_peft = torch_answers(peft_model, prompts, stop, args.new_tokens)

    rows = [
        dict(
            task=r["task"],
            reference=r["output"],
            fft=tok.decode(a[:-1] if a[-1:] == [stop] else a),
            hf_same=a == b,
            peft_same=a == c,
        )  # fmt: skip
        for r, a, b, c in zip(records, ours, theirs_hf, theirs_peft, strict=True)
    ]
    summary = dict(
        workdir=args.workdir,
        prompts=len(rows),
        hf_identical=sum(r["hf_same"] for r in rows),
        peft_identical=sum(r["peft_same"] for r in rows),
        fft_exact_match=sum(r["fft"].strip() == r["reference"] for r in rows),
        wall_s=round(time.time() - t0, 1),
    )
    with open(os.path.join(out, "roundtrip.json"), "w") as f:
        json.dump(dict(summary=summary, rows=rows), f, indent=2)
    print(json.dumps(summary))
    return 0 if summary["hf_identical"] == summary["peft_identical"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
