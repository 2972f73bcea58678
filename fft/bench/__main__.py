"""Command line of fft.bench (see the package docstring): `python -m fft.bench <what> [flags]`."""

from __future__ import annotations

import argparse
import os
import sys

WHATS = ("train", "generate", "memory", "loader", "ppo", "grpo", "packing")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fft.bench", description=__doc__)
    sub = p.add_subparsers(dest="what", required=True)

    def common(sp, preset, **defaults):
        sp.add_argument("--preset", default=preset, help="model preset (fft.models.presets)")
        sp.add_argument(
            "--init_from",
            default="",
            help="a real model's architecture instead of --preset (any fft.load name: "
            "'smollm2-135m-instruct', an HF dir, a .gguf, an fft workdir)",
        )
        sp.add_argument("--dtype", default="float32", help="compute dtype")
        sp.add_argument("--peer_threads", type=int, default=2, help="torch threads of the peer")
        sp.add_argument("--rounds", type=int, default=2, help="interleaved rounds fft / peer")
        sp.add_argument(
            "--tokenizer_docs",
            type=int,
            default=2000,
            help="general-corpus docs the benchmark tokenizer is trained on",
        )
        sp.set_defaults(**defaults)

    t = sub.add_parser("train", help="train step tokens/s, MFU, compile, memory")
    common(t, "20m")
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--steps", type=int, default=8, help="timed steps (per round)")
    t.add_argument("--vs", default="", help="'transformers': same config in HF + torch AdamW")
    t.add_argument(
        "--lora_rank", type=int, default=0, help="LoRA on the default targets (peer: peft)"
    )
    t.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    t.add_argument("--scan_layers", action="store_true")
    t.add_argument("--loss_chunk", type=int, default=128, help="chunked cross-entropy positions")
    t.add_argument("--peak_n", type=int, default=2048, help="n of the n x n matmul-peak probe")
    t.add_argument(
        "--onednn",
        action="store_true",
        help="compile the step with oneDNN dots (XLA:CPU; an A/B lead, not the loop's)",
    )

    g = sub.add_parser("generate", help="greedy generation new tokens/s")
    common(g, "20m")
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--prompt", type=int, default=64)
    g.add_argument("--new", type=int, default=128)
    g.add_argument("--reps", type=int, default=5, help="timed calls (per round)")
    g.add_argument("--vs", default="")

    m = sub.add_parser("memory", help="params + optimizer bytes: full f32/bf16, LoRA, QLoRA")
    common(m, "1b")
    m.add_argument("--lora_rank", type=int, default=8)
    m.add_argument("--allocate", action="store_true", help="also allocate and report peak RSS")

    lo = sub.add_parser("loader", help="tokenize+pack throughput vs train step")
    common(lo, "tiny")
    lo.add_argument("--seq", type=int, default=256)
    lo.add_argument("--batch", type=int, default=8)
    lo.add_argument("--docs", type=int, default=20000, help="general-corpus documents")
    lo.add_argument("--loader_seconds", type=float, default=5.0, help="time the loader this long")
    lo.add_argument("--steps", type=int, default=3, help="timed train steps")
    lo.add_argument("--loss_chunk", type=int, default=128)

    pp = sub.add_parser("ppo", help="PPO iteration time split")
    common(pp, "micro")
    pp.add_argument("--rollout_batch", type=int, default=16)
    pp.add_argument("--batch", type=int, default=8, help="PPO minibatch rows")
    pp.add_argument("--epochs", type=int, default=2)
    pp.add_argument("--prompt", type=int, default=56)
    pp.add_argument("--new", type=int, default=24)
    pp.add_argument("--lora_rank", type=int, default=4)
    pp.add_argument("--iters", type=int, default=3)

    gr = sub.add_parser("grpo", help="GRPO on arithmetic: generation vs training time, tokens/s")
    common(gr, "micro")
    gr.add_argument("--algo", default="grpo", help="registry preset: grpo | dr_grpo | dapo | ...")
    gr.add_argument("--rollout_batch", type=int, default=16, help="completions per iteration")
    gr.add_argument("--group_size", type=int, default=8, help="completions per problem")
    gr.add_argument("--batch", type=int, default=16, help="minibatch rows")
    gr.add_argument("--epochs", type=int, default=1)
    gr.add_argument("--prompt", type=int, default=160, help="prompt tokens (left-padded)")
    gr.add_argument("--new", type=int, default=64, help="max new tokens")
    gr.add_argument("--lora_rank", type=int, default=8)
    gr.add_argument("--iters", type=int, default=3)

    pk = sub.add_parser("packing", help="instruction tuning, packed vs padded rows")
    common(pk, "tiny")
    pk.add_argument("--seq", type=int, default=256)
    pk.add_argument("--batch", type=int, default=8)
    pk.add_argument("--steps", type=int, default=3, help="steps per mode per round")
    pk.add_argument("--records", type=int, default=2000)
    pk.add_argument("--loss_chunk", type=int, default=128)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from fft.bench import common
    from fft.config_lib import FFTError

    common.set_base(**common.base_settings(), bench=args.what)
    from fft.bench import generate, grpo, loader, memory, ppo, train

    run = {
        "train": train.run_train,
        "generate": generate.run_generate,
        "memory": memory.run_memory,
        "loader": loader.run_loader,
        "ppo": ppo.run_ppo,
        "grpo": grpo.run_grpo,
        "packing": train.run_packing,
    }[args.what]
    try:
        run(args)
    except FFTError as e:
        print(f"fft.bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
