"""Runs the Trainer on the toy LM; used as a real subprocess by the resume tests.

    python tests/train/toy_run.py WORKDIR STEPS [BLOCK_AT]

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

import fft  # noqa: E402, F401


def config(steps: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.steps, c.batch_size, c.seq_len, c.seed = steps, 8, 8, 0
    c.optim = dict(name="adamw", lr=1e-2, schedule="warmup_cosine", warmup_steps=3,
                   min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0, grad_accum=2)  # fmt: skip
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding = dict(rules=())
    c.checkpoint_every, c.keep_checkpoints, c.eval_every, c.log_every = 5, 3, 0, 5
    return c


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
    results = train(config(steps), workdir, method="toy", build_model=build(), loss_fn=lm_loss,
                    train_data=data)  # fmt: skip
    print("DONE", results.get("preempted", False), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
