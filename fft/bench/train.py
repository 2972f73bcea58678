"""`train`: tokens/s, MFU, compile time and peak memory of the fft train step (random tokens);
`packing`: target tokens/s of instruction tuning with packing versus one example per row.

    python -m fft.bench train --preset=20m --seq=256 --batch=8 --steps=8 --vs=transformers
    python -m fft.bench packing --preset=tiny --seq=256 --batch=8
"""

from __future__ import annotations

import time

import numpy as np

from fft.bench import common
from fft.bench.common import emit, log


def _fft_settings(args, cfg) -> dict:
    return {
        **common.model_name(args),
        "lora_rank": args.lora_rank,
        "seq_len": args.seq,
        "batch": args.batch,
        "dtype": cfg.dtype,
        "remat": cfg.remat,
        "scan_layers": cfg.scan_layers,
        "onednn": bool(getattr(args, "onednn", False)),
    }


def run_train(args) -> None:
    cfg = common.bench_config(
        args, args.seq, remat=args.remat, scan_layers=args.scan_layers, dtype=args.dtype
    )
    settings = _fft_settings(args, cfg)
    peak = common.matmul_peak(args.peak_n)
    trainer = common.lm_trainer(cfg, lora_rank=args.lora_rank, chunk=args.loss_chunk)
    emit("params", trainer.n_params, "count", trainable=trainer.n_trainable, **settings)
    rng = np.random.default_rng(0)
    batches = [
        common.device_batch(
            common.random_lm_batch(rng, args.batch, args.seq, common.token_vocab(cfg))
        )
        for _ in range(2)
    ]
    compile_s = trainer.compile(batches[0], common.ONEDNN_OPTIONS if args.onednn else None)
    _, first_s = trainer.step(batches[0])
    emit("compile_s", compile_s, "s", first_step_s=first_s, **settings)

    peer = None
    if args.vs == "transformers":
        from fft.bench.peers import PeerProcess

        peer = PeerProcess(cfg, threads=args.peer_threads, batch=args.batch, seq=args.seq,
                           lora_rank=args.lora_rank)  # fmt: skip
        peer.train(2)  # warm-up, as hf_torch.py
    elif args.vs:
        raise SystemExit(f"--vs={args.vs!r}: only 'transformers' runs in-process.")

    # Rounds interleave fft and the peer so that both see the same machine load.
    fft_ts, peer_ts, metrics = [], [], {}
    for r in range(args.rounds if peer is not None else 1):
        for i in range(args.steps):
            metrics, dt = trainer.step(batches[i % 2])
            fft_ts.append(dt)
        if peer is not None:
            peer_ts += peer.train(args.steps)
        log(f"round {r}: fft median {np.median(fft_ts):.3f}s/step"
            + (f", transformers {np.median(peer_ts):.3f}s/step" if peer_ts else ""))  # fmt: skip

    from fft.bench.peers import summary

    tok = args.batch * args.seq
    s = summary(fft_ts, tok)
    fpt = common.train_flops_per_token(trainer.n_params, cfg.n_layers, args.seq, cfg.d_model)
    emit(
        "train_tokens_per_s",
        s["rate"],
        "tokens/s",
        tok_s_min=s["rate_min"],
        tok_s_max=s["rate_max"],
        step_s_median=s["s_median"],
        step_s_min=s["s_min"],
        step_s_max=s["s_max"],
        steps=s["n"],
        loss=metrics.get("loss"),
        **settings,
        **common.env_note(),
    )
    emit(
        "mfu",
        fpt * s["rate"] / (peak * 1e9),
        "fraction",
        flops_per_token=fpt,
        peak_gflops_best=peak,
        achieved_gflops=fpt * s["rate"] / 1e9,
        formula="(6*N_params + 12*layers*seq*d_model) * tokens/s / best 2048^2 f32 matmul GFLOP/s",
        **settings,
    )
    common.emit_peak_memory(**settings)
    if peer is not None:
        peer.close()
        p = summary(peer_ts, tok)
        emit(
            "train_tokens_per_s",
            p["rate"],
            "tokens/s",
            framework="transformers",
            tok_s_min=p["rate_min"],
            tok_s_max=p["rate_max"],
            step_s_median=p["s_median"],
            steps=p["n"],
            params=peer.n_params,
            trainable=peer.n_trainable,
            mfu=common.train_flops_per_token(peer.n_params, cfg.n_layers, args.seq, cfg.d_model)
            * p["rate"]
            / (peak * 1e9),
            **peer.settings,
            **settings,
        )
        emit(
            "speedup_vs_transformers",
            s["rate"] / p["rate"],
            "ratio",
            what="train tokens/s, fft / transformers, same run (peer in a worker process), "
            "interleaved rounds",
            fft_tokens_per_s=s["rate"],
            transformers_tokens_per_s=p["rate"],
            rounds=args.rounds,
            **settings,
        )


# =============================================================================================
# Packing versus padding on instruction data
# =============================================================================================


def _instruction_iterator(tokenizer, records, *, seq, batch, packing):
    from fft.data import pipeline

    encode = pipeline.make_encoder("instruction", tokenizer, max_len=seq)
    return pipeline.make_train_iterator(
        [records], encode, seq_len=seq, batch_size=batch, packing=packing, seed=0
    )


def run_packing(args) -> None:
    from fft.data.synthetic import World

    cfg0 = common.model_config(args.preset, args.seq)
    tokenizer = common.synthetic_tokenizer(cfg0.vocab_size, args.tokenizer_docs)
    cfg = cfg0.replace(vocab_size=tokenizer.vocab_size)
    records = World(0).instruction_data("train", args.records)
    trainer = common.lm_trainer(cfg, chunk=args.loss_chunk)
    settings = {"preset": args.preset, "seq_len": args.seq, "batch": args.batch,
                "format": "instruction", "records": args.records}  # fmt: skip
    its = {
        mode: _instruction_iterator(
            tokenizer, records, seq=args.seq, batch=args.batch, packing=(mode == "packed")
        )
        for mode in ("packed", "padded")
    }
    # Same shapes in both modes: one compiled step serves both.
    trainer.compile(common.device_batch(next(its["packed"])))
    for it in its.values():  # warm-up, untimed
        trainer.step(common.device_batch(next(it)))
    res = {m: {"targets": 0.0, "real": 0.0, "step_s": 0.0, "data_s": 0.0} for m in its}
    for _ in range(args.rounds):  # interleaved
        for mode, it in its.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                b = next(it)
                res[mode]["data_s"] += time.perf_counter() - t
                _, dt = trainer.step(common.device_batch(b))
                res[mode]["step_s"] += dt
                res[mode]["targets"] += float(b["loss_mask"].sum())
                res[mode]["real"] += float((b["segment_ids"] > 0).sum())
    n_tok = args.rounds * args.steps * args.batch * args.seq
    for mode, r in res.items():
        total_s = r["step_s"] + r["data_s"]
        emit(
            "train_target_tokens_per_s",
            r["targets"] / total_s,
            "tokens/s",
            mode=mode,
            what="loss-bearing (response) tokens trained per second, data + step time",
            target_fraction=r["targets"] / n_tok,
            real_token_fraction=r["real"] / n_tok,
            step_s_mean=r["step_s"] / (args.rounds * args.steps),
            data_s_mean=r["data_s"] / (args.rounds * args.steps),
            **settings,
        )
    p, q = res["packed"], res["padded"]
    emit(
        "speedup_packing_vs_padding",
        (p["targets"] / (p["step_s"] + p["data_s"])) / (q["targets"] / (q["step_s"] + q["data_s"])),
        "ratio",
        **settings,
    )
