"""Export round trip of an instruction-tuned LoRA run: fft's greedy answers on held-out prompts
are reproduced token for token by transformers loading the HF export (LoRA folded in) and by
peft loading the PEFT adapter on top of the exported base.

The run is the instruction smoke config with LoRA (fft:micro, a few steps: CI speed); the same
check on SmolLM2-135M-Instruct is experiments/export_roundtrip/run.py.
"""

import os

import numpy as np
import pytest

import fft
from fft import config_lib
from fft.data import formats
from fft.data.synthetic import World
from fft.sampling import generate_tokens, left_pad

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEW_TOKENS = 10


def greedy_torch(model, torch_mod, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy continuations, one prompt at a time (no padding), argmax of the full logits."""
    out = []
    with torch_mod.no_grad():
        for ids in prompts:
            seq = torch_mod.tensor([ids])
            for _ in range(n):
                nxt = model(input_ids=seq).logits[0, -1].argmax()
                seq = torch_mod.cat([seq, nxt.view(1, 1)], dim=1)
            out.append(seq[0, len(ids) :].tolist())
    return out


def greedy_fft(model, prompts: list[list[int]], pad_id: int, n: int) -> list[list[int]]:
    """fft's batched KV-cache greedy generation of the same prompts (left-padded)."""
    tokens, mask = left_pad(prompts, pad_id)
    res = generate_tokens(model, tokens, mask, max_new_tokens=n, temperature=0.0)
    return np.asarray(res.tokens).tolist()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from fft import main

    workdir = str(tmp_path_factory.mktemp("sft_lora"))
    config = config_lib.load_config(os.path.join(REPO, "configs", "instruction.py"), "smoke")
    config.lora.rank = 4
    config.lora.alpha = 8.0
    config.optim.lr = 1e-2  # moves the adapters visibly in a few steps
    config.instruction.eval_examples = 8
    config.instruction.eval_batch_size = 8
    main.run(config, workdir)
    return workdir, config


def test_hf_and_peft_exports_reproduce_greedy_answers(lora_run, transformers_mod, torch_mod,
                                                      tmp_path):  # fmt: skip
    peft = pytest.importorskip("peft")
    workdir, config = lora_run
    model, tok = fft.load(workdir)  # latest checkpoint, LoRA merged
    base, _ = fft.load(config.init_from)
    records = World(config.instruction.world_seed).instruction_data("test", 6)
    prompts = [formats.encode_prompt(r, "instruction", tok) for r in records]
    pad = tok.pad_id if tok.pad_id >= 0 else 0
    ours = greedy_fft(model, prompts, pad, NEW_TOKENS)
    # The adapters changed the answers: a round trip that drops them cannot pass.
    assert ours != greedy_fft(base, prompts, pad, NEW_TOKENS)

    hf_dir = fft.export(workdir, tmp_path / "hf", format="hf")
    hf_model = transformers_mod.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert greedy_torch(hf_model, torch_mod, prompts, NEW_TOKENS) == ours

    base_dir = fft.export(config.init_from, tmp_path / "base", format="hf")
    adapter_dir = fft.export(workdir, tmp_path / "adapter", format="peft")
    base_hf = transformers_mod.AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = peft.PeftModel.from_pretrained(base_hf, adapter_dir).eval()
    assert greedy_torch(peft_model, torch_mod, prompts, NEW_TOKENS) == ours
