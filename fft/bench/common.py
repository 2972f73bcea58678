"""What every benchmark shares: JSON lines, timing statistics, the in-process matmul peak,
peak host memory, model FLOPs, and the fft train step exactly as the Trainer assembles it
(`fft.train.trainer.prepare`).

Figures follow /work/shared/BENCHMARKS.md and the peer scripts (`jax_ref.py`, `hf_torch.py`):
a timed quantity is the median over steps (min/max beside it), the matmul peak is the best of 10
jitted 2048x2048 float32 matmuls, and MFU = (6N + 12*L*T*d) * tokens/s / that peak.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_BASE: dict = {}

# XLA:CPU oneDNN for dots, per compiled function (`bench train --onednn`: an A/B lead).
ONEDNN_OPTIONS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


# =============================================================================================
# Output
# =============================================================================================


def set_base(**kw) -> None:
    """Settings added to every following JSON line (framework, versions, device)."""
    _BASE.update(kw)


def base_settings() -> dict:
    import flax
    import optax

    return {
        "framework": "fft",
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
    }


def emit(metric: str, value, unit: str, **kw) -> dict:
    """Prints one JSON object: metric, value, unit, the base settings, then `kw`."""
    d = {"metric": metric, "value": value, "unit": unit}
    d.update(_BASE)
    d.update(kw)
    print(json.dumps(d, default=_json_default), flush=True)
    return d


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def log(msg: str) -> None:
    """Progress to stderr (stdout carries only JSON lines)."""
    print(f"[fft.bench] {msg}", file=sys.stderr, flush=True)


# =============================================================================================
# Timing and memory
# =============================================================================================


def stats(ts: list[float]) -> dict:
    return {"min": min(ts), "median": statistics.median(ts), "max": max(ts), "n": len(ts)}


def timed(fn: Callable, *args, **kwargs):
    """(result with every array ready, seconds)."""
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def emit_peak_memory(**settings) -> dict:
    """The `peak_memory_bytes` line of a benchmark that may run a peer (in its own process)."""
    return emit(
        "peak_memory_bytes",
        peak_rss_bytes(),
        "bytes",
        what="peak host RSS of the fft process (ru_maxrss; the peer runs in its own process)",
        **settings,
    )


def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # a threefry key: two uint32
    return np.dtype(dtype).itemsize


def tree_bytes(tree) -> int:
    """Bytes of a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(math.prod(x.shape) * _itemsize(x.dtype) for x in jax.tree.leaves(tree)))


def tree_size(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


_PEAK: dict = {}


def matmul_peak(n: int = 2048, reps: int = 10, emit_line: bool = True) -> float:
    """Best-of-`reps` GFLOP/s of a jitted n x n float32 matmul (as jax_ref.py); cached."""
    if n in _PEAK:
        return _PEAK[n]
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    for _ in range(2):
        jax.block_until_ready(mm(a, b))
    ts = [timed(mm, a, b)[1] for _ in range(reps)]
    s = stats(ts)
    flop = 2 * n**3
    peak = flop / s["min"] / 1e9
    if emit_line:
        emit(
            "matmul_f32_gflops",
            flop / s["median"] / 1e9,
            "GFLOP/s",
            best_gflops=peak,
            worst_gflops=flop / s["max"] / 1e9,
            n=n,
            reps=s["n"],
        )
    _PEAK[n] = peak
    return peak


def train_flops_per_token(n_params: int, n_layers: int, seq: int, d_model: int) -> int:
    """6N + 12*L*T*d: the formula of jax_ref.py / hf_torch.py (BENCHMARKS.md's MFU)."""
    return 6 * n_params + 12 * n_layers * seq * d_model


# =============================================================================================
# Models and data
# =============================================================================================


def model_config(preset: str, seq: int = 0, **overrides):
    """The preset's ModelConfig, max_seq_len raised to `seq` where needed."""
    from fft.models.presets import get_preset

    cfg = get_preset(preset)
    if seq and seq > cfg.max_seq_len:
        cfg = cfg.replace(max_seq_len=seq)
    return cfg.replace(**overrides) if overrides else cfg


def bench_config(args, seq: int = 0, **overrides):
    """The ModelConfig a benchmark runs: `--init_from`'s architecture when given (any name
    `fft.load` / `config.init_from` accepts: 'smollm2-135m-instruct', an HF dir, a .gguf, an fft
    workdir), else `--preset`'s; max_seq_len raised to `seq` where needed. Only the architecture
    is read: throughput does not depend on the weights' values."""
    init_from = getattr(args, "init_from", "")
    if not init_from:
        return model_config(args.preset, seq, **overrides)
    from fft import pretrained, zoo

    path = zoo.resolve(init_from, what=f"--init_from={init_from!r}")
    cfg = pretrained.load_spec(path).model_config
    if seq and seq > cfg.max_seq_len:
        cfg = cfg.replace(max_seq_len=seq)
    return cfg.replace(**overrides) if overrides else cfg


def model_name(args) -> dict:
    """The settings that name the benchmarked model: preset, or init_from."""
    init_from = getattr(args, "init_from", "")
    return {"init_from": init_from} if init_from else {"preset": args.preset}


def token_vocab(cfg) -> int:
    """Ids random tokens are drawn from: the real vocabulary (padding rows are no ids, and the
    transformers peer has none)."""
    return getattr(cfg, "real_vocab_size", 0) or cfg.vocab_size


def random_lm_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict:
    """A full (unpacked, no padding) Batch of random tokens; every token but the first a target."""
    tokens = rng.integers(0, vocab, (batch, seq), dtype=np.int32)
    loss_mask = np.ones((batch, seq), np.float32)
    loss_mask[:, 0] = 0.0
    return {
        "tokens": tokens,
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": loss_mask,
    }


_TOKENIZERS: dict = {}


def synthetic_tokenizer(vocab_size: int, n_docs: int = 2000, seed: int = 0):
    """A sentencepiece tokenizer trained on the synthetic general corpus (as methods/pretrain.py
    does for fft:<name>), cached per process. Training it is not part of any figure."""
    key = (vocab_size, n_docs, seed)
    if key not in _TOKENIZERS:
        from fft import tokenizers
        from fft.data.synthetic import World

        t0 = time.perf_counter()
        texts = World(seed).general_corpus(n_docs)
        _TOKENIZERS[key] = tokenizers.train_sentencepiece(texts, vocab_size)
        log(f"trained a {vocab_size}-piece tokenizer on {n_docs} docs in "
            f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
    return _TOKENIZERS[key]


# =============================================================================================
# The fft train step, as the Trainer assembles it (fft.train.trainer.prepare)
# =============================================================================================


def default_optim(**kw) -> dict:
    """`config.optim` of a fine-tuning run (base_config's values), constant lr, no warmup."""
    from fft import config_lib

    o = dict(config_lib.base_config().optim)
    o.update(schedule="constant", warmup_steps=0, lr=1e-4)
    o.update(kw)
    return o


def prepare_step(build_model, loss_fn, trainable, optim: dict, steps: int, *, grad_accum=1,
                 seed=0):  # fmt: skip
    """The Trainer's own step assembly (`fft.train.trainer.prepare`) for `build_model()` on
    one device: what the bench times is what trains."""
    from flax import nnx

    from fft import sharding
    from fft.train import trainer
    from fft.train.recipe import ModelSpec, Recipe

    recipe = Recipe(
        method="bench",
        model=ModelSpec(build_model),
        loss_fn=loss_fn,
        train_data=lambda ctx: iter(()),
        batch_spec=lambda n: {},
        trainable=nnx.Param if trainable is None else trainable,
    )
    loop = trainer.LoopConfig(steps=steps, batch_size=1, seed=seed, optim=optim,
                              grad_accum=grad_accum)  # fmt: skip
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with sharding.use_mesh(mesh, loop.rules):
        return trainer.prepare(recipe, loop, mesh)


def param_counts(abstract_state) -> tuple[int, int]:
    """(trainable, total) numbers of nnx.Param scalars of a (abstract) TrainState."""
    from flax import nnx

    n_train = tree_size(nnx.filter_state(abstract_state.params, nnx.Param))
    n_frozen = tree_size(nnx.filter_state(abstract_state.frozen, nnx.Param))
    return n_train, n_train + n_frozen


class FFTTrainer:
    """The real train step (`make_train_step` + `make_optimizer` + a LossFn), jitted with
    `donate_argnums=0` like the loop, on a model built from `build_model()`.

    Attributes:
      state: the TrainState (donated and replaced by every `step`).
      n_params: total model params; n_trainable: trainable ones.
      compile_s: lower + compile seconds of the step (after `compile(batch)`).
    """

    def __init__(
        self,
        build_model: Callable,
        loss_fn,
        *,
        trainable=None,
        optim: dict | None = None,
        steps: int = 1000,
        grad_accum: int = 1,
        seed: int = 0,
    ):
        prep = prepare_step(build_model, loss_fn, trainable, optim or default_optim(), steps,
                            grad_accum=grad_accum, seed=seed)  # fmt: skip
        self.graphdef = prep.graphdef
        self.abstract_state = prep.abstract_state
        self.n_trainable, self.n_params = param_counts(prep.abstract_state)
        self.state = jax.jit(prep.init_fn, out_shardings=prep.state_sh)()
        self._jitted = jax.jit(prep.step_fn, donate_argnums=0)
        self._compiled = None
        self.compile_s = None

    def compile(self, batch, compiler_options: dict | None = None) -> float:
        """Lowers and compiles the step for `batch`'s shapes; returns the seconds it took."""
        t = time.perf_counter()
        lowered = self._jitted.lower(self.state, batch)
        opts = {"compiler_options": compiler_options} if compiler_options else {}
        self._compiled = lowered.compile(**opts)
        self.compile_s = time.perf_counter() - t
        return self.compile_s

    def step(self, batch) -> tuple[dict, float]:
        """One step, waited for; returns (metrics as floats, seconds)."""
        fn = self._compiled if self._compiled is not None else self._jitted
        t = time.perf_counter()
        self.state, metrics = fn(self.state, batch)
        jax.block_until_ready(metrics)
        dt = time.perf_counter() - t
        return {k: float(v) for k, v in metrics.items()}, dt


def on_policy_iteration(data, trainer) -> tuple[float, float, float]:
    """One rollout's worth of steps of on-policy `data` (PPOBatches) on `trainer`, as the
    Trainer runs them (bind the live state, pull, step); returns (pull_s, step_s, total_s):
    the pulls hold the rollout (generation + scoring), the steps the training."""
    t_iter = time.perf_counter()
    pull_s, step_s = 0.0, 0.0
    for _ in range(data.steps_per_rollout):
        data.bind_state(trainer.graphdef, trainer.state)
        t = time.perf_counter()
        b = next(data)
        pull_s += time.perf_counter() - t
        step_s += trainer.step(device_batch(b))[1]
    return pull_s, step_s, time.perf_counter() - t_iter


def lm_builder(cfg, *, lora_rank: int = 0, seed: int = 0):
    """`() -> Transformer` (LoRA on the default targets when rank > 0) and its trainable filter."""
    from flax import nnx

    from fft.models import lora as lora_lib
    from fft.models.transformer import Transformer
    from fft.train.state import trainable_filter_from_config

    def build():
        rngs = nnx.Rngs(seed)
        model = Transformer(cfg, rngs=rngs)
        if lora_rank > 0:
            lora_lib.apply_lora(model, rank=lora_rank, alpha=2.0 * lora_rank, rngs=rngs)
        return model

    return build, trainable_filter_from_config(None, lora_rank)


def lm_trainer(cfg, *, lora_rank: int = 0, optim: dict | None = None, chunk: int = 128, seed=0):
    """An FFTTrainer of the next-token LM loss (fft.train.lm), LoRA attached when rank > 0."""
    from fft.train import lm

    build, trainable = lm_builder(cfg, lora_rank=lora_rank, seed=seed)
    return FFTTrainer(
        build,
        lm.next_token_loss_fn(chunk),
        trainable=trainable,
        optim=optim,
        seed=seed,
    )


def device_batch(batch_np: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch_np.items()}


def env_note() -> dict:
    """What else may be using the CPU (figures here are noisy: BENCHMARKS.md)."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    return {"cpus": os.cpu_count(), "load1": load1}
