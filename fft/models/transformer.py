"""The decoder-only LM family (Llama, Mistral, Qwen2/3, Gemma, Gemma2/3, GPT-2 by config).

Param tree (docs/architecture.md): `embed`, `pos_embed` (learned positions), `layers.<i>.{attn_norm,
attn.{q,k,v,o,q_norm,k_norm}, mlp_norm, mlp.{gate,up,down}, post_attn_norm, post_mlp_norm}`,
`final_norm`, `lm_head` (untied). With `scan_layers=True`, `layers` is one Block whose params
carry a leading `layers` axis of size n_layers and the forward pass is a `lax.scan` over it.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from fft import sharding
from fft.config_lib import FFTError
from fft.models import attention
from fft.models import layers as L
from fft.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """Static-size KV cache: `k, v` per layer `[B, K, S, Dh]`, next slot `index`, `valid [B,S]`.

    Sliding-window layers (mistral, gemma2/3) keep a *masked full cache*: every layer has all S
    slots and a local layer's bias hides the slots more than `sliding_window` behind the query
    (`layers.cache_bias`), so it sees what the train-time mask shows. Simple and exact; a ring
    buffer of `sliding_window` slots would save memory on long generations, not compute here.
    """

    k: tuple
    v: tuple
    index: jax.Array
    valid: jax.Array


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (+ gemma2 post norms)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = L.make_norm(cfg)
        self.attn = L.Attention(cfg, rngs=rngs)
        self.mlp_norm = L.make_norm(cfg)
        self.mlp = L.MLP(cfg, rngs=rngs)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:
            self.post_attn_norm = L.make_norm(cfg)
            self.post_mlp_norm = L.make_norm(cfg)

    def __call__(self, x_btd, cos, sin, bias, kv=None, index=None):
        h_btd, kv = self.attn(self.attn_norm(x_btd), cos, sin, bias, kv, index)
        if self.post_norms:
            h_btd = self.post_attn_norm(h_btd)
        x_btd = sharding.constrain(x_btd + h_btd, L.BTD)
        h_btd = self.mlp(self.mlp_norm(x_btd))
        if self.post_norms:
            h_btd = self.post_mlp_norm(h_btd)
        return sharding.constrain(x_btd + h_btd, L.BTD), kv


# The q/k/v projection outputs, named in layers.Attention.
QKV_NAMES = ("query_proj", "key_proj", "value_proj")


def _remat_policy(name: str):
    """The `jax.checkpoint` policy of a `ModelConfig.remat` name (not 'none').

    'full' recomputes everything; 'dots' keeps the weight matmul outputs (dots without batch
    dims: the projections, not the attention einsums); 'save_qkv' keeps only the q/k/v
    projections (attention's inputs: its backward needs them, the MLP is cheap to redo);
    'offload' keeps the same dots as 'dots' but in pinned host memory, freeing device memory
    for longer sequences at the price of host<->device copies (TPU/GPU only).
    """
    if name == "offload":
        if jax.default_backend() == "cpu":
            raise FFTError(
                "model.remat='offload' moves saved activations to pinned host memory, which "
                "needs a TPU or GPU; on CPU use remat='dots', 'save_qkv' or 'full'."
            )
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    if name == "save_qkv":
        return jax.checkpoint_policies.save_only_these_names(*QKV_NAMES)
    return {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


# The logit of a padding row. Finite on purpose: its softmax probability is exactly 0 all the
# same, but -inf would make KL terms p * (log p - log q) compute 0 * (-inf - -inf) = NaN.
PADDING_LOGIT = -1e9


def mask_padding_logits(logits_btv, n_tokens: int):
    """Sets the logits of ids >= `n_tokens` (padding rows of the vocabulary) to PADDING_LOGIT.

    Args:
      logits_btv: float32 logits, vocabulary last.
      n_tokens: the real vocabulary size.

    Returns:
      The logits, padding ids never chosen and of probability 0.
    """
    ids = jnp.arange(logits_btv.shape[-1])
    return jnp.where(ids < n_tokens, logits_btv, jnp.asarray(PADDING_LOGIT, logits_btv.dtype))


class Transformer(nnx.Module):
    """Decoder-only language model. See docs/architecture.md for the interface."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.remat != "none":
            _remat_policy(cfg.remat)  # an unusable policy (offload on CPU) fails here, not in jit
        self.cfg = cfg
        dt, pdt = L.dtype_of(cfg.dtype), L.dtype_of(cfg.param_dtype)
        self.embed = L.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=pdt, rngs=rngs)
        if cfg.pos == "learned":
            self.pos_embed = L.Embed(
                cfg.max_seq_len,
                cfg.d_model,
                names=(None, "embed"),
                dtype=dt,
                param_dtype=pdt,
                rngs=rngs,
            )
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = L.make_norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = L.Linear(
                (cfg.d_model,),
                (cfg.vocab_size,),
                names=("embed", "vocab"),
                dtype=dt,
                param_dtype=pdt,
                rngs=rngs,
            )
        self.local_layers = tuple(cfg.is_local_layer(i) for i in range(cfg.n_layers))
        self.inv_freq = (
            tuple(L.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).tolist())
            if cfg.pos == "rope"
            else None
        )
        # gemma3: sliding-window layers rotate with their own (unscaled) base.
        self.inv_freq_local = (
            tuple(L.rope_inv_freq(cfg.head_dim, cfg.rope_local_theta).tolist())
            if cfg.pos == "rope" and cfg.rope_local_theta and any(self.local_layers)
            else None
        )

    # -- public API ----------------------------------------------------------------------------

    def __call__(self, tokens, positions=None, segment_ids=None):
        """Logits `[B, T, V]` float32 of `tokens [B, T]`.

        Args:
          tokens: int32 token ids.
          positions: `[B, T]` positions (default `arange(T)`; packed rows restart per segment).
          segment_ids: `[B, T]`; attention stays within equal nonzero ids (0 = padding).
        """
        return self.logits(self.hidden_states(tokens, positions, segment_ids))

    def hidden_states(self, tokens, positions=None, segment_ids=None):
        """Final-norm hidden states `[B, T, D]` in the compute dtype."""
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        x_btd = self._embed(tokens, positions)
        ropes = self._ropes(positions)
        backend = attention.resolve(self.cfg.attention, self.cfg.dtype)
        bias_g = attention.train_mask(backend, segment_ids) if not all(self.local_layers) else None
        bias_l = (
            attention.train_mask(backend, segment_ids, self.cfg.sliding_window)
            if any(self.local_layers)
            else None
        )
        x_btd = self._run_layers(x_btd, ropes, bias_g, bias_l)
        return self.final_norm(x_btd)

    def logits(self, hidden_btd):
        """Unembeds hidden states: float32 logits `[B, T, V]` (with the optional softcap).

        With `cfg.real_vocab_size`, the padding ids' logits are PADDING_LOGIT (probability 0).
        """
        # The head accumulates into float32 whatever the compute dtype: the loss (and sampling)
        # read logits whose differences matter at a precision bf16 (8 bits) does not keep.
        if self.cfg.tie_embeddings:
            logits = self.embed.attend(hidden_btd, out_dtype=jnp.float32)
        else:
            logits = self.lm_head(hidden_btd, out_dtype=jnp.float32)
        logits = logits.astype(jnp.float32)
        if self.cfg.logit_softcap:
            c = self.cfg.logit_softcap
            logits = jnp.tanh(logits / c) * c
        if self.cfg.real_vocab_size:
            logits = mask_padding_logits(logits, self.cfg.real_vocab_size)
        return sharding.constrain(logits, ("batch", "length", "act_vocab"))

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for `batch_size` rows of `max_len` slots."""
        cfg = self.cfg
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        zeros = lambda: jnp.zeros(shape, L.dtype_of(cfg.dtype))  # noqa: E731
        return KVCache(
            k=tuple(zeros() for _ in range(cfg.n_layers)),
            v=tuple(zeros() for _ in range(cfg.n_layers)),
            index=jnp.zeros((), jnp.int32),
            valid=jnp.zeros((batch_size, max_len), bool),
        )

    def decode(self, tokens, positions, cache: KVCache, token_mask=None, last_only=False):
        """Runs `tokens [B, T]` against the cache, writing them at slots index..index+T-1.

        Args:
          tokens, positions: `[B, T]`.
          cache: from `init_cache` or a previous `decode`.
          token_mask: `[B, T]` bool, which new slots are real (False = left padding).
          last_only: unembed only the last position (a prefill needs no more; the full
            `[B, T, V]` float32 logits of a long prompt would be most of its memory).

        Returns:
          (logits float32 `[B, T, V]` (`[B, 1, V]` with last_only), the updated cache)
        """
        b, t = tokens.shape
        if token_mask is None:
            token_mask = jnp.ones((b, t), bool)
        index = cache.index
        valid = jax.lax.dynamic_update_slice(cache.valid, token_mask.astype(bool), (0, index))
        x_btd = self._embed(tokens, positions)
        ropes = self._ropes(positions)
        bias_g = L.cache_bias(valid, index, t)
        bias_l = (
            L.cache_bias(valid, index, t, self.cfg.sliding_window)
            if any(self.local_layers)
            else None
        )
        ks, vs = [], []
        for i, block in enumerate(self._blocks()):
            bias = bias_l if self.local_layers[i] else bias_g
            cos, sin = ropes[self.local_layers[i]]
            x_btd, (k, v) = block(x_btd, cos, sin, bias, (cache.k[i], cache.v[i]), index)
            ks.append(k)
            vs.append(v)
        if last_only:
            x_btd = x_btd[:, -1:]
        logits = self.logits(self.final_norm(x_btd))
        return logits, KVCache(k=tuple(ks), v=tuple(vs), index=index + t, valid=valid)

    # -- internals -----------------------------------------------------------------------------

    def _embed(self, tokens, positions):
        x_btd = self.embed(tokens)
        if self.cfg.embed_scale:
            # HF gemma casts the normalizer to the compute dtype before multiplying.
            x_btd = x_btd * jnp.asarray(math.sqrt(self.cfg.d_model), x_btd.dtype)
        if self.cfg.pos == "learned":
            x_btd = x_btd + self.pos_embed(positions)
        return sharding.constrain(x_btd, L.BTD)

    def _ropes(self, positions):
        """((cos, sin) of global layers, (cos, sin) of local ones): index by `is_local`."""
        if self.inv_freq is None:
            return (None, None), (None, None)
        glob = L.rope_cos_sin(positions, jnp.asarray(self.inv_freq, jnp.float32))
        if self.inv_freq_local is None:
            return glob, glob
        return glob, L.rope_cos_sin(positions, jnp.asarray(self.inv_freq_local, jnp.float32))

    def _blocks(self):
        """The blocks one by one (stacked params are sliced per layer)."""
        if not self.cfg.scan_layers:
            return list(self.layers)
        graphdef, state = nnx.split(self.layers)
        return [
            nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            for i in range(self.cfg.n_layers)
        ]

    def _run_layers(self, x_btd, ropes, bias_g, bias_l):
        cfg = self.cfg
        if cfg.scan_layers:
            return self._scan_layers(x_btd, ropes, bias_g, bias_l)
        for i, block in enumerate(self.layers):
            bias = bias_l if self.local_layers[i] else bias_g
            cos, sin = ropes[self.local_layers[i]]
            if cfg.remat == "none":
                x_btd, _ = block(x_btd, cos, sin, bias)
                continue
            graphdef, state = nnx.split(block)

            def run(state, x_btd, cos, sin, bias, graphdef=graphdef):
                return nnx.merge(graphdef, state)(x_btd, cos, sin, bias)[0]

            x_btd = jax.checkpoint(run, policy=_remat_policy(cfg.remat))(
                state, x_btd, cos, sin, bias
            )
        return x_btd

    def _scan_layers(self, x_btd, ropes, bias_g, bias_l):
        graphdef, state = nnx.split(self.layers)
        local = jnp.asarray(self.local_layers)
        (cos_g, sin_g), (cos_l, sin_l) = ropes

        def body(x_btd, xs):
            layer_state, is_local = xs
            if cos_g is cos_l:
                cos, sin = cos_g, sin_g
            else:  # gemma3: this layer's rotary tables
                cos, sin = jnp.where(is_local, cos_l, cos_g), jnp.where(is_local, sin_l, sin_g)
            if bias_g is None:
                bias = bias_l
            elif bias_l is None:
                bias = bias_g
            else:  # mixed local/global layers (gemma2): pick this layer's mask
                bias = attention.select_mask(is_local, bias_l, bias_g)
            return nnx.merge(graphdef, layer_state)(x_btd, cos, sin, bias)[0], None

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=_remat_policy(self.cfg.remat), prevent_cse=False)
        x_btd, _ = jax.lax.scan(body, x_btd, (state, local))
        return x_btd


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose params have a leading 'layers' axis (one slice per layer)."""

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return Block(cfg, rngs=rngs)

    return make(rngs)


def count_params(model: nnx.Module) -> int:
    """Number of parameters (nnx.Param leaves, LoRA included)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
