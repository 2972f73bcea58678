"""Benchmarks: `python -m fft.bench <what> [flags]`, one JSON object per line on stdout.

    train     tokens/s, MFU, compile time, peak memory of the train step (--vs=transformers)
    generate  new tokens/s of the compiled sampler (--vs=transformers)
    memory    params + optimizer bytes: full f32 / bf16 params, LoRA, QLoRA int8 / nf4 (shapes)
    loader    tokenize + pack throughput vs the train step's consumption
    ppo       one PPO iteration's rollout / update time split
    grpo      one GRPO iteration on arithmetic: generation vs training time and tokens/s
    packing   target tokens/s of instruction tuning, packed vs padded rows

Every line carries `metric`, `value`, `unit` and the settings; names follow
/work/shared/BENCHMARKS.md (`train_tokens_per_s`, `generate_tokens_per_s`, `mfu`,
`matmul_f32_gflops`, `compile_s`, `peak_memory_bytes`, `params`, `speedup_vs_<peer>`).
Progress goes to stderr. Figures are medians over steps; a comparison runs the peer in the
same process, interleaved in rounds, because this kind of machine drifts by 15% run to run.
"""


def main(argv=None) -> int:
    """Runs `python -m fft.bench` with `argv` (list of strings); returns the exit status."""
    from fft.bench.__main__ import main as _main  # imported on call: `-m` runs that module

    return _main(argv)
