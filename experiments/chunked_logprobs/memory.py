"""Compiled temp memory of token log-probs (+ entropy, + gradients): unchunked vs chunked.

A 128k-vocabulary head on a tiny hidden size, so the `[B, T, V]` f32 logits dominate and the
saving of `fft.train.losses.chunked_token_logprobs` shows as one number per case:

    python experiments/chunked_logprobs/memory.py            # B=4, T=1024, D=64, V=131072

Cases (what each caller computes):
  score      logp only, no gradient          perplexity eval, rollout old/reference log-probs
  dpo_grad   d/d(h, W) of sum(logp * mask)   DPO pair log-probs in the loss
  ppo_grad   d/d(h, W) of sum((logp - 0.01 H) * mask), logits / temperature
                                             PPO/GRPO loss with its entropy bonus

Memory is XLA's own account of the compiled executable (`.lower().compile().memory_analysis()`),
nothing is run, so it works on CPU as well as on an accelerator.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fft.models.transformer import mask_padding_logits  # noqa: E402
from fft.rl import objectives  # noqa: E402
from fft.rl.rollout import shift_right  # noqa: E402
from fft.train import losses  # noqa: E402


def make_cases(chunk: int, real_vocab: int, temperature: float):
    """{case: (unchunked fn, chunked fn)}, each `(h_btd, w_dv, tokens_bt, mask_bt) -> out`."""

    def unembed(w):  # a padded vocabulary, as `Transformer.logits` with real_vocab_size
        return lambda h: mask_padding_logits(
            jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32), real_vocab
        )

    def plain(h, w, tok, with_entropy):
        logits = unembed(w)(h) / temperature
        lp = losses.token_logprobs(logits, tok)
        if not with_entropy:
            return lp
        return lp, shift_right(objectives.entropy_from_logits(logits))

    def chunked(h, w, tok, with_entropy):
        return losses.chunked_token_logprobs(
            h, unembed(w), tok, chunk=chunk, temperature=temperature, with_entropy=with_entropy
        )

    def score(fn):
        return lambda h, w, tok, m: (fn(h, w, tok, False) * m).sum(-1)

    def dpo_grad(fn):
        return jax.grad(lambda h, w, tok, m: (fn(h, w, tok, False) * m).sum(), argnums=(0, 1))

    def ppo_grad(fn):
        def obj(h, w, tok, m):
            lp, ent = fn(h, w, tok, True)
            return ((lp - 0.01 * ent) * m).sum()

        return jax.grad(obj, argnums=(0, 1))

    return {
        name: (make(plain), make(chunked))
        for name, make in (("score", score), ("dpo_grad", dpo_grad), ("ppo_grad", ppo_grad))
    }


def temp_bytes(fn, args) -> int:
    """XLA's temp (scratch) allocation of `fn` compiled for `args`."""
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--vocab", type=int, default=131072, help="rows of the head (padded)")
    p.add_argument("--real_vocab", type=int, default=128256, help="real ids (llama-3's vocab)")
    p.add_argument("--chunks", default="128,512", help="comma-separated chunk sizes")
    p.add_argument("--dtype", default="bfloat16", help="hidden / head dtype")
    args = p.parse_args()

    b, t, d, v = args.batch, args.seq, args.d_model, args.vocab
    dt = jnp.dtype(args.dtype)
    shapes = (
        jax.ShapeDtypeStruct((b, t, d), dt),
        jax.ShapeDtypeStruct((d, v), dt),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
        jax.ShapeDtypeStruct((b, t), jnp.float32),
    )
    mib = 2.0**20
    logits_mib = b * t * v * 4 / mib
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind}")
    print(f"B={b} T={t} D={d} V={v} (real {args.real_vocab}) dtype={args.dtype}; "
          f"one [B,T,V] f32 logits array = {logits_mib:.0f} MiB")  # fmt: skip
    print(f"{'case':<10} {'chunk':>6} {'unchunked MiB':>14} {'chunked MiB':>12} {'saving':>8}")
    unchunked = {}  # does not depend on the chunk size: compiled once per case
    for chunk in [int(c) for c in args.chunks.split(",")]:
        for name, (plain, chunked) in make_cases(chunk, args.real_vocab, 0.7).items():
            if name not in unchunked:
                unchunked[name] = temp_bytes(plain, shapes) / mib
            u, c = unchunked[name], temp_bytes(chunked, shapes) / mib
            print(f"{name:<10} {chunk:>6} {u:>14.1f} {c:>12.1f} {u / max(c, 1e-9):>7.1f}x")


if __name__ == "__main__":
    main()
