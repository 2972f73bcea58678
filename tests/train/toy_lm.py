"""A tiny NNX language model and a deterministic, checkpointable data iterator for train tests.

Kept independent of fft.models so the train core is tested on its own; every param and
activation names logical axes, like the real models.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft import sharding
from fft.train import losses

VOCAB, D, F, T = 32, 16, 32, 8


class ToyLM(nnx.Module):
    """embed -> 2 x (rms-norm, relu MLP, residual) -> lm_head."""

    def __init__(self, rngs: nnx.Rngs, vocab=VOCAB, d=D, f=F, n_layers=2):
        init = nnx.initializers.normal(0.2)
        self.embed = nnx.Param(init(rngs.params(), (vocab, d)), out_sharding=("vocab", "embed"))
        self.layers = nnx.List([_Block(rngs, d, f) for _ in range(n_layers)])
        self.final_norm = nnx.Param(jnp.ones((d,)), out_sharding=("norm",))
        self.lm_head = nnx.Param(init(rngs.params(), (d, vocab)), out_sharding=("embed", "vocab"))

    def hidden_states(self, tokens):
        x_btd = sharding.constrain(
            jnp.take(self.embed[...], tokens, axis=0), ("batch", "length", "act_embed")
        )
        for layer in self.layers:
            x_btd = layer(x_btd)
        return _rms(x_btd) * self.final_norm[...]

    def logits(self, h_btd):
        logits = jnp.einsum("btd,dv->btv", h_btd, self.lm_head[...])
        return sharding.constrain(logits, ("batch", "length", "act_vocab"))

    def __call__(self, tokens, positions=None, segment_ids=None):
        return self.logits(self.hidden_states(tokens))


class _Block(nnx.Module):
    def __init__(self, rngs, d, f):
        init = nnx.initializers.normal(0.2)
        self.norm = nnx.Param(jnp.ones((d,)), out_sharding=("norm",))
        self.up = nnx.Param(init(rngs.params(), (d, f)), out_sharding=("embed", "mlp"))
        self.up_bias = nnx.Param(jnp.zeros((f,)), out_sharding=("mlp",))
        self.down = nnx.Param(init(rngs.params(), (f, d)), out_sharding=("mlp", "embed"))

    def __call__(self, x_btd):
        h = _rms(x_btd) * self.norm[...]
        h_btf = jax.nn.relu(jnp.einsum("btd,df->btf", h, self.up[...]) + self.up_bias[...])
        h_btf = sharding.constrain(h_btf, ("batch", "length", "act_mlp"))
        return x_btd + jnp.einsum("btf,fd->btd", h_btf, self.down[...])


def _rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def build(seed=0):
    return lambda: ToyLM(nnx.Rngs(seed))


def lm_loss(model, batch, rng):
    """Next-token loss; aux carries the target count so grad accumulation is exact."""
    del rng
    loss = losses.next_token_loss(model(batch["tokens"]), batch)
    return loss, {"loss_weight": losses.num_targets(batch)}


def make_batch(index: int, batch_size: int, seq_len: int = T, seed: int = 0) -> dict:
    """Batch `index` of a fixed stream: random tokens, a ragged loss mask (varying counts)."""
    r = np.random.default_rng([seed, index])
    tokens = r.integers(0, VOCAB, (batch_size, seq_len), dtype=np.int32)
    lengths = r.integers(2, seq_len + 1, (batch_size,))
    seg = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    mask = seg.astype(np.float32)
    mask[:, 0] = 0
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()
    return {"tokens": tokens, "positions": pos, "segment_ids": seg, "loss_mask": mask}


def batch_digest(batch) -> str:
    return hashlib.sha1(batch["tokens"].tobytes()).hexdigest()[:12]


class ToyIterator:
    """Deterministic stream of batches with get_state()/set_state() (like fft's pipeline).

    Optionally appends "index digest" lines to `log_path` as batches are produced.
    """

    def __init__(self, batch_size: int, seed: int = 0, log_path: str | None = None, hook=None):
        self.batch_size, self.seed, self.index = batch_size, seed, 0
        self.log_path, self.hook = log_path, hook
        self.stats = {"skipped_records": 0}

    def __iter__(self):
        return self

    def __next__(self):
        if self.hook is not None:
            self.hook(self.index)
        batch = make_batch(self.index, self.batch_size, seed=self.seed)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(f"{self.index} {batch_digest(batch)}\n")
        self.index += 1
        return batch

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def train(config, workdir, *, method, build_model, loss_fn, train_data, evaluate=None,
          model_config=None, trainable=None):  # fmt: skip
    """Runs the toy LM through the real Trainer as a one-off Recipe (the loop's tests)."""
    import copy

    import jax
    from flax import nnx

    from fft.train import trainer
    from fft.train.recipe import ModelSpec, Recipe

    twin = copy.copy(train_data)  # one batch of a copy: the stream's fields and dtypes
    twin.log_path = twin.hook = None
    probe = next(twin)

    def spec(batch: int) -> dict:
        return {k: jax.ShapeDtypeStruct((batch, *v.shape[1:]), v.dtype) for k, v in probe.items()}

    recipe = Recipe(
        method=method,
        model=ModelSpec(build_model, None, model_config),
        loss_fn=loss_fn,
        train_data=lambda ctx: train_data,
        batch_spec=spec,
        evaluate=(lambda ctx: evaluate) if evaluate is not None else None,
        trainable=nnx.Param if trainable is None else trainable,
    )
    return trainer.fit(config, workdir, recipe)
