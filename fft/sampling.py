"""Batched sampling with a static KV cache in one compiled loop.

`generate_tokens` runs one jitted function: prefill the left-padded prompts into a cache sized
exactly prompt + new tokens, then a `lax.while_loop` that decodes one token per step and exits
early once every row has hit a stop token. It returns the new tokens, their log-probabilities
under the distribution they were sampled from (the model's, divided by the temperature; the raw
model's when greedy; before any top-k / top-p cut), and a mask up to and including the first stop.
`generate` wraps it with a tokenizer: strings in, strings out.

On one x86-64 CPU device (no mesh, or a 1-device one) the loop's small-batch matmuls and its
attention over the cache run `fft.kernels.cpu` kernels instead of XLA's dots (same tokens).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fft import sharding
from fft.kernels import cpu as cpu_kernels
from fft.models import layers as L


@flax.struct.dataclass
class GenerateOutput:
    """tokens `[B,N]` int32; logprobs `[B,N]` f32 (log_softmax(logits / temperature) of the
    chosen token; raw logits when greedy);
    mask `[B,N]` (1 up to and including the first stop token); lengths `[B]` = mask.sum(1)."""

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to a common length.

    Returns:
      (tokens `[B,P]` int32, mask `[B,P]` int32 with 1 on real tokens)
    """
    p = max(1, max((len(t) for t in token_lists), default=1))
    tokens = np.full((len(token_lists), p), pad_id, np.int32)
    mask = np.zeros((len(token_lists), p), np.int32)
    for i, ids in enumerate(token_lists):
        if len(ids):
            tokens[i, p - len(ids) :] = ids
            mask[i, p - len(ids) :] = 1
    return tokens, mask


def sample_logits(logits_bv, rng, *, temperature, top_k: int, top_p, greedy=None, nucleus=None):
    """Greedy (temperature 0) or temperature / top-k / top-p sampling. Returns `[B]` int32.

    `temperature` and `top_p` may be traced; then the static `greedy` (temperature 0) and
    `nucleus` (top_p < 1) flags say which computation to build.
    """
    greedy = temperature <= 0.0 if greedy is None else greedy
    nucleus = top_p < 1.0 if nucleus is None else nucleus
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if nucleus:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep a token while the mass before it is < top_p (the most likely one always stays).
        before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1), 1)
        cutoff = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _generate_impl(graphdef, state, *args, **kwargs):
    """`_generate_loop` on the merged model; with the CPU kernels' packed weights registered
    for this trace (packing runs once per call, outside the loop)."""
    model = nnx.merge(graphdef, state)
    if not _kernels_ok():
        return _generate_loop(model, *args, **kwargs)
    with cpu_kernels.decode_weights(L.packable_weights(model)):
        return _generate_loop(model, *args, **kwargs)


def _kernels_ok() -> bool:
    """The CPU decode kernels read whole weights: only on one device (no mesh, or a 1-device
    mesh such as the training loop's on a single CPU)."""
    ctx = sharding.current()
    return (ctx is None or ctx[0].size == 1) and cpu_kernels.available()


def _generate_loop(
    model,
    prompt_bp,
    mask_bp,
    rng,
    temperature,
    top_p,
    stops,
    *,
    max_new_tokens,
    greedy,
    top_k,
    nucleus,
):
    b, p = prompt_bp.shape
    n = max_new_tokens
    mask_bp = mask_bp.astype(bool)
    positions_bp = jnp.maximum(jnp.cumsum(mask_bp.astype(jnp.int32), axis=1) - 1, 0)
    cache = model.init_cache(b, p + n)
    logits_b1v, cache = model.decode(
        prompt_bp, positions_bp, cache, token_mask=mask_bp, last_only=True
    )
    sample = functools.partial(
        sample_logits,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
        nucleus=nucleus,
    )

    def cond(carry):
        i, done = carry[0], carry[4]
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, logits_bv, pos_b, cache, done, tokens, logprobs, out_mask, rng = carry
        rng, key = jax.random.split(rng)
        tok_b = sample(logits_bv, key)
        # Log-probs of the tempered distribution the token came from: what RL learners need.
        scaled = logits_bv if greedy else logits_bv.astype(jnp.float32) / temperature
        lp_b = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tok_b[:, None], axis=-1)[
            :, 0
        ]
        live = ~done
        tokens = tokens.at[:, i].set(jnp.where(live, tok_b, 0))
        logprobs = logprobs.at[:, i].set(jnp.where(live, lp_b, 0.0))
        out_mask = out_mask.at[:, i].set(live.astype(jnp.int32))
        done = done | jnp.any(tok_b[:, None] == stops[None, :], axis=-1)
        # The cache has exactly p + n slots; the last step's decode writes slot p + n - 1.
        step_logits, cache = model.decode(tok_b[:, None], pos_b[:, None], cache)
        return (i + 1, step_logits[:, 0], pos_b + 1, cache, done, tokens, logprobs, out_mask, rng)

    init = (
        jnp.zeros((), jnp.int32),
        logits_b1v[:, 0],  # left padding: the last column is every row's last prompt token
        positions_bp[:, -1] + 1,
        cache,
        jnp.zeros((b,), bool),
        jnp.zeros((b, n), jnp.int32),
        jnp.zeros((b, n), jnp.float32),
        jnp.zeros((b, n), jnp.int32),
        rng,
    )
    out = jax.lax.while_loop(cond, body, init)
    tokens, logprobs, out_mask = out[5], out[6], out[7]
    return GenerateOutput(tokens=tokens, logprobs=logprobs, mask=out_mask, lengths=out_mask.sum(1))


# Only what changes the program is static; temperature, top_p and the stop ids are traced so
# that sweeping them (RLHF, evals) does not recompile.
_STATIC = ("graphdef", "max_new_tokens", "greedy", "top_k", "nucleus")
_generate = jax.jit(_generate_impl, static_argnames=_STATIC)


def _stop_array(stop_tokens: Sequence[int]) -> jax.Array:
    """Stop ids padded with -1 (never sampled) to a multiple of 8: fewer shapes, fewer compiles."""
    ids = [int(t) for t in stop_tokens]
    return jnp.asarray(ids + [-1] * (-len(ids) % 8 or (8 if not ids else 0)), jnp.int32)


def generate_tokens(
    model: nnx.Module,
    prompt_tokens_bp,
    prompt_mask_bp,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    rng: jax.Array | None = None,
) -> GenerateOutput:
    """Samples continuations of left-padded prompts in one compiled loop.

    Args:
      model: a decoder with `init_cache(batch, length)` and `decode(tokens, positions, cache,
        token_mask=None, last_only=False)` (e.g. `fft.models.transformer.Transformer`).
      prompt_tokens_bp: `[B,P]` int32, left-padded (see `left_pad`).
      prompt_mask_bp: `[B,P]`, 1 on real tokens.
      max_new_tokens: N, tokens to generate per row.
      temperature: 0 = greedy; else sampling temperature.
      top_k: keep the k most likely tokens (0 = off).
      top_p: nucleus mass (1.0 = off).
      stop_tokens: ids that end a row (included in its mask).
      rng: PRNG key for sampling (default key 0).

    Returns:
      GenerateOutput with tokens, logprobs, mask `[B,N]` and lengths `[B]`.
    """
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    # Prompts go where the model is: sharded over its mesh's batch axes when it has one (the
    # outputs then may span processes: read them with fft.sharding.to_host).
    prompt_bp, mask_bp = sharding.put_like(
        (np.asarray(prompt_tokens_bp, np.int32), np.asarray(prompt_mask_bp, np.int32)), state
    )
    return _generate(
        graphdef,
        state,
        prompt_bp,
        mask_bp,
        rng,
        jnp.asarray(max(float(temperature), 1e-6), jnp.float32),
        jnp.asarray(top_p, jnp.float32),
        _stop_array(stop_tokens),
        max_new_tokens=int(max_new_tokens),
        greedy=float(temperature) <= 0.0,
        top_k=int(top_k),
        nucleus=float(top_p) < 1.0,
    )


def generate(
    model: nnx.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[str]:
    """Generates a completion string for every prompt (the stop token is not included).

    All prompts run as one batch through a static KV cache (prompt + `max_new_tokens`) in one
    compiled loop, which stops early once every row has ended. Typical use:

        model, tokenizer = fft.load("fft:tiny")  # or a workdir, an HF directory, a .gguf file
        fft.generate(model, tokenizer, ["The cat"], max_new_tokens=16)

    Args:
      model: a decoder (`init_cache`/`decode`), e.g. the first value `fft.load` returns.
      tokenizer: `fft.tokenizers.Tokenizer` (encode/decode, bos_id, eos_id, pad_id; -1 = absent).
      prompts: prompt strings; encoded with BOS when the tokenizer has one. The prompt is sent as
        it is: apply the run's template (e.g. "### Instruction: ...") yourself.
      max_new_tokens: tokens to generate per prompt, at most.
      temperature: 0 = greedy (the default); above 0, sample from softmax(logits / temperature).
      top_k: when sampling, keep only the k most likely tokens (0 = off).
      top_p: when sampling, keep the smallest set of tokens with this much mass (1.0 = off).
      seed: sampling seed (the same seed and prompts give the same completions).
      stop_at_eos: end a row at the tokenizer's EOS.

    Returns:
      The decoded completions, one string per prompt, in order.
    """
    add_bos = getattr(tokenizer, "bos_id", -1) >= 0
    ids = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else max(tokenizer.eos_id, 0)
    tokens_bp, mask_bp = left_pad(ids, pad)
    stops = (tokenizer.eos_id,) if stop_at_eos and tokenizer.eos_id >= 0 else ()
    out = generate_tokens(
        model,
        tokens_bp,
        mask_bp,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stops,
        rng=jax.random.key(seed),
    )
    tokens, lengths = sharding.to_host((out.tokens, out.lengths))
    texts = []
    for row, n in zip(tokens, lengths, strict=True):
        row = [int(t) for t in row[:n]]
        if stops and row and row[-1] in stops:
            row = row[:-1]
        texts.append(tokenizer.decode(row))
    return texts
