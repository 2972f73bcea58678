"""`generate`: new tokens/s of `fft.sampling.generate_tokens` (greedy, KV cache, one compiled
loop), compile time excluded; optionally against HF `model.generate` in the same process.

    python -m fft.bench generate --preset=20m --batch=8 --prompt=64 --new=128 --vs=transformers

Both sides time the whole call, prefill of the prompt included (as hf_torch.py does).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from fft.bench import common
from fft.bench.common import emit, log


def run_generate(args) -> None:
    from fft.models.transformer import Transformer
    from fft.sampling import generate_tokens

    cfg = common.bench_config(args, args.prompt + args.new, dtype=args.dtype)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    settings = {
        **common.model_name(args),
        "batch": args.batch,
        "prompt_len": args.prompt,
        "new_tokens": args.new,
        "greedy": True,
        "kv_cache": True,
        "weights": "random init (both sides): no stop tokens, every row makes exactly new_tokens",
        "dtype": cfg.dtype,
    }
    emit("params", int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
         "count", **settings)  # fmt: skip
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, common.token_vocab(cfg), (args.batch, args.prompt), dtype=np.int32)
    mask = np.ones_like(prompt)

    def fft_call() -> float:
        t = time.perf_counter()
        out = generate_tokens(model, prompt, mask, max_new_tokens=args.new)
        jax.block_until_ready(out.tokens)
        dt = time.perf_counter() - t
        assert int(out.lengths.min()) == args.new  # no stop tokens: every row runs to the end
        return dt

    first = fft_call()

    peer = None
    if args.vs == "transformers":
        from fft.bench.peers import PeerProcess

        peer = PeerProcess(cfg, threads=args.peer_threads, batch=args.batch, prompt=args.prompt,
                           new=args.new)  # fmt: skip
        peer.generate(1)  # warm-up
    elif args.vs:
        raise SystemExit(f"--vs={args.vs!r}: only 'transformers' runs in-process.")

    fft_ts, peer_ts = [], []
    for r in range(args.rounds if peer is not None else 1):
        fft_ts += [fft_call() for _ in range(args.reps)]
        if peer is not None:
            peer_ts += peer.generate(args.reps)
        log(f"round {r}: fft median {np.median(fft_ts):.3f}s/call"
            + (f", transformers {np.median(peer_ts):.3f}s/call" if peer_ts else ""))  # fmt: skip

    from fft.bench.peers import summary

    units = args.batch * args.new
    s = summary(fft_ts, units)
    emit(
        "generate_tokens_per_s",
        s["rate"],
        "tokens/s",
        tok_s_min=s["rate_min"],
        tok_s_max=s["rate_max"],
        call_s_median=s["s_median"],
        reps=s["n"],
        note="new tokens per second of the whole call, prefill included, compile excluded",
        **settings,
        **common.env_note(),
    )
    emit("compile_s", max(first - s["s_median"], 0.0), "s", first_call_s=first,
         what="first call minus the median call", **settings)  # fmt: skip
    common.emit_peak_memory(**settings)
    if peer is not None:
        peer.close()
        p = summary(peer_ts, units)
        emit(
            "generate_tokens_per_s",
            p["rate"],
            "tokens/s",
            framework="transformers",
            tok_s_min=p["rate_min"],
            tok_s_max=p["rate_max"],
            call_s_median=p["s_median"],
            reps=p["n"],
            **peer.settings,
            **settings,
        )
        emit(
            "speedup_vs_transformers",
            s["rate"] / p["rate"],
            "ratio",
            what="generate new tokens/s, fft / transformers, same run (peer in a worker "
            "process), interleaved rounds",
            fft_tokens_per_s=s["rate"],
            transformers_tokens_per_s=p["rate"],
            rounds=args.rounds,
            **settings,
        )
