"""Runs the Trainer on the toy LM; used as a real subprocess by the resume tests.

    python tests/train/toy_run.py WORKDIR STEPS [BLOCK_AT]

With TOY_LORA=1 the model is instead the `micro` fft Transformer with rank-4 LoRA adapters, and
only the adapters train (a frozen-base run: its frozen weights are checkpointed once).

Every batch the iterator produces is appended to WORKDIR/batches.txt ("index digest"). With
BLOCK_AT, producing batch BLOCK_AT blocks (until WORKDIR/release exists) so that the parent
can kill or signal the process at a known step.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

import fft  # noqa: E402, F401
from fft.models.lora import LoRAParam as LORA  # noqa: E402


def config(steps: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.steps, c.batch_size, c.seq_len, c.seed = steps, 8, 8, 0
    c.optim = dict(name="adamw", lr=1e-2, schedule="warmup_cosine", warmup_steps=3,
                   min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0, grad_accum=2)  # fmt: skip
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding = dict(rules=())
    c.checkpoint_every, c.keep_checkpoints, c.eval_every, c.log_every = 5, 3, 0, 5
    return c


def lora_build(seed=0):
    """The `micro` Transformer with rank-4 LoRA adapters on every linear layer."""
    from fft.models import lora, presets
    from fft.models.transformer import Transformer

    def make():
        rngs = nnx.Rngs(seed)
        model = Transformer(presets.get_preset("micro"), rngs=rngs)
        return lora.apply_lora(model, rank=4, alpha=8.0, rngs=rngs)

    return make


def main(workdir, steps, block_at=None):
    from toy_lm import ToyIterator, build, lm_loss, train

    os.makedirs(workdir, exist_ok=True)
    release = os.path.join(workdir, "release")

    def hook(index):
        if block_at is not None and index == block_at:
            print(f"BLOCKED {index}", flush=True)
            while not os.path.exists(release):
                time.sleep(0.05)

    data = ToyIterator(8, log_path=os.path.join(workdir, "batches.txt"), hook=hook)
    build_model, trainable = (lora_build(), LORA) if os.environ.get("TOY_LORA") == "1" else (
        build(), nnx.Param)  # fmt: skip
    results = train(config(steps), workdir, method="toy", build_model=build_model, loss_fn=lm_loss,
                    train_data=data, trainable=trainable)  # fmt: skip
    print("DONE", results.get("preempted", False), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
