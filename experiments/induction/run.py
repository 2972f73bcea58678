"""Can a base model copy from its context? (The skill instruction tuning needs first.)

Two probes, then optionally the copy training that shows how far away the skill is:

  repeat   held-out general documents (first 60 tokens) written twice: mean per-token loss of
           the first and of the second occurrence. A model with induction heads predicts the
           second copy far better; fft:tiny v2 does not (3.26 vs 3.66).
  copy     `BOS x1..xn BOS x1..xn` with random ids (n = 2..11): loss on the second half.
           Chance is log(#ids); a copying model is near 0.

    python experiments/induction/run.py                        # probes of fft:tiny
    python experiments/induction/run.py --train_steps=250       # + dense copy training (~6 min)
    python experiments/induction/run.py --model=runs/instruction --ids=100:4096

`--train_steps` trains the model on copy batches (128 x 24 tokens, AdamW at a constant
`--lr`) and prints both probes every 50 steps: on fft:tiny v2 with ids 100:700 the copy loss
goes 12.2 -> 6.2 (step 100) -> 3.5 (200) -> 0.2 (250), a phase change after ~0.6 M tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import fft  # noqa: E402
from fft.data.synthetic import World  # noqa: E402


def token_nll(model, tokens: np.ndarray) -> np.ndarray:
    """Per-token next-token loss [B, T-1] of `tokens` [B, T] (one segment per row)."""
    t = jnp.asarray(tokens)
    positions = jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape)
    logits = model(t, positions, jnp.ones_like(t)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return np.asarray(-jnp.take_along_axis(logp, t[:, 1:, None], -1)[..., 0])


def copy_batch(rng, batch: int, seq: int, lo: int, hi: int, bos: int):
    """`BOS x BOS x` rows and a mask over the second x (as next-token targets)."""
    tokens = np.zeros((batch, seq), np.int32)
    mask = np.zeros((batch, seq - 1), np.float32)
    for b in range(batch):
        n = int(rng.integers(2, (seq - 2) // 2 + 1))
        x = rng.integers(lo, hi, size=n)
        row = [bos, *x, bos, *x]
        tokens[b, : len(row)] = row
        mask[b, n + 1 : 2 * n + 1] = 1  # targets at positions n+2 .. 2n+1
    return tokens, mask


def probes(model, tokenizer, docs, rng, lo, hi) -> dict:
    rows = [tokenizer.encode(d)[:60] for d in docs]
    tokens = np.zeros((len(rows), 121), np.int32)  # one padded batch: one compile
    for i, ids in enumerate(rows):
        tokens[i, : 2 * len(ids) + 1] = [tokenizer.bos_id, *ids, *ids]
    nll = token_nll(model, tokens)
    first = [nll[i, : len(ids)].mean() for i, ids in enumerate(rows)]
    second = [nll[i, len(ids) : 2 * len(ids)].mean() for i, ids in enumerate(rows)]
    tokens, mask = copy_batch(rng, 64, 24, lo, hi, tokenizer.bos_id)
    nll = token_nll(model, tokens)
    return {
        "repeat_first": float(np.mean(first)),
        "repeat_second": float(np.mean(second)),
        "copy": float((nll * mask).sum() / mask.sum()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="fft:tiny", help="fft:<preset>, fft workdir or HF dir")
    p.add_argument("--ids", default="100:700", help="lo:hi range of the random copy ids")
    p.add_argument("--train_steps", type=int, default=0, help="dense copy training steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save", default="", help="write the trained model here (HF directory)")
    args = p.parse_args()
    try:
        lo, hi = (int(x) for x in args.ids.split(":"))
    except ValueError:
        p.error(f"--ids={args.ids!r}: expected lo:hi, e.g. 100:700")
    try:
        model, tokenizer = fft.load(args.model)
    except fft.config_lib.FFTError as e:
        sys.exit(f"fft: error: {e}")
    if not 0 < lo < hi <= tokenizer.vocab_size:
        sys.exit(
            f"fft: error: --ids={args.ids}: need 0 < lo < hi <= {tokenizer.vocab_size} (vocab)"
        )
    docs = World(0).general_corpus(40, split="test")
    train_rng = np.random.default_rng(0)
    t0 = time.time()

    def report(step):
        r = probes(model, tokenizer, docs, np.random.default_rng(1), lo, hi)
        cells = "  ".join(f"{k} {v:.3f}" for k, v in r.items())
        print(f"step {step:4d}  {cells}  ({time.time() - t0:.0f}s)", flush=True)

    report(0)
    if not args.train_steps:
        return
    opt = nnx.Optimizer(model, optax.adamw(args.lr, weight_decay=0.0), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens, mask):
        def loss_fn(m):
            t = tokens
            positions = jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape)
            logp = jax.nn.log_softmax(m(t, positions, jnp.ones_like(t)).astype(jnp.float32))
            nll = -jnp.take_along_axis(logp[:, :-1], t[:, 1:, None], -1)[..., 0]
            return (nll * mask).sum() / mask.sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    for i in range(1, args.train_steps + 1):
        tokens, mask = copy_batch(train_rng, 128, 24, lo, hi, tokenizer.bos_id)
        step(model, opt, jnp.asarray(tokens), jnp.asarray(mask))
        if i % 50 == 0 or i == args.train_steps:
            report(i)
    if args.save:
        from fft.interop.hf import export_hf

        try:
            export_hf(model, model.cfg, args.save, tokenizer)
        except OSError as e:
            sys.exit(f"fft: error: --save={args.save}: cannot write there ({e.strerror})")
        print(f"saved to {args.save}")


if __name__ == "__main__":
    main()
