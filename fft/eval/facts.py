"""Cloze fact accuracy: does the model complete "The capital of Veltoria is" with "Marusk"?

Two ways to ask, both over a list of questions `{prompt, answer, relation?, ...}` (the synthetic
world's `fact_questions(era)` or any records with these fields):

  generate  greedy decoding of a few tokens after the prompt; correct when the completion's first
            word equals the answer (exact match, the strict measure).
  score     the answer is ranked against candidate answers of the same relation by the summed
            log-probability of " <candidate>" after the prompt; correct when it ranks first.
            (A multiple-choice measure: it moves before greedy decoding does, so small models and
            short runs still show a signal.)
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np
from flax import nnx

from fft import sampling as generate_lib
from fft import sharding
from fft.train import losses

MODES = ("generate", "score")


def _first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,;:!?") if words else ""


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    add_bos = getattr(tokenizer, "bos_id", -1) >= 0
    return tokenizer.encode(prompt, add_bos=add_bos)


def generate_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 8,
                     batch_size: int = 128) -> list[str]:  # fmt: skip
    """Greedy completions (first word only) of `prompts`, batched."""
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else max(tokenizer.eos_id, 0)
    stops = (tokenizer.eos_id,) if tokenizer.eos_id >= 0 else ()
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = [_prompt_ids(tokenizer, p) for p in prompts[i : i + batch_size]]
        # Pad the batch to a fixed size so every chunk reuses one compiled loop.
        n_real = len(chunk)
        chunk += [chunk[0]] * (batch_size - n_real) if len(prompts) > batch_size else []
        tokens_bp, mask_bp = generate_lib.left_pad(chunk, pad)
        res = generate_lib.generate_tokens(
            model, tokens_bp, mask_bp, max_new_tokens=max_new_tokens, stop_tokens=stops
        )
        toks, mask = sharding.to_host((res.tokens, res.mask))
        for b in range(n_real):
            ids = [int(t) for t, m in zip(toks[b], mask[b], strict=True) if m and t not in stops]
            out.append(_first_word(tokenizer.decode(ids)))
    return out


@nnx.jit
def _seq_logprobs(model, tokens, segment_ids, target_mask):
    hidden = model.hidden_states(tokens, None, segment_ids)
    return (losses.chunked_token_logprobs(hidden, model.logits, tokens) * target_mask).sum(-1)


def score_continuations(model, tokenizer, pairs: Sequence[tuple[str, str]], *,
                        batch_size: int = 256) -> np.ndarray:  # fmt: skip
    """Summed log p(continuation | prompt) for each (prompt, continuation) pair.

    The continuation is encoded on its own and appended to the prompt's ids (the tokenizers fft
    trains add no dummy prefix, so " Marusk" keeps its leading space as in running text).
    """
    rows = []
    for prompt, cont in pairs:
        p, c = _prompt_ids(tokenizer, prompt), tokenizer.encode(cont)
        rows.append((p + c, [0] * len(p) + [1] * len(c)))
    width = max(len(t) for t, _ in rows)
    width = -(-width // 8) * 8  # few distinct shapes -> few compilations
    scores = np.zeros(len(rows), np.float32)
    pad = max(tokenizer.pad_id, 0)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        n = len(chunk)
        b = batch_size if len(rows) > batch_size else n
        tokens = np.full((b, width), pad, np.int32)
        seg = np.zeros((b, width), np.int32)
        tmask = np.zeros((b, width), np.float32)
        for j, (t, m) in enumerate(chunk):
            tokens[j, : len(t)], seg[j, : len(t)], tmask[j, : len(t)] = t, 1, m
        placed = sharding.put_like([tokens, seg, tmask], nnx.state(model))
        scores[i : i + n] = sharding.to_host(_seq_logprobs(model, *placed))[:n]
    return scores


def candidates_by_relation(questions: Sequence[dict]) -> dict[str, list[str]]:
    """{relation: sorted distinct answers} over `questions` (e.g. every era's questions)."""
    out = collections.defaultdict(set)
    for q in questions:
        out[q.get("relation", "")].add(q["answer"])
    return {r: sorted(v) for r, v in out.items()}


def fact_accuracy(model, tokenizer, questions: Sequence[dict], *, mode: str = "generate",
                  candidates: dict[str, list[str]] | None = None,
                  max_new_tokens: int = 8) -> dict:  # fmt: skip
    """Accuracy on cloze questions.

    Args:
      model: a decoder (`hidden_states`, `logits`; `init_cache`/`decode` for 'generate').
      tokenizer: the model's tokenizer.
      questions: dicts with `prompt` and `answer` (and `relation` for 'score').
      mode: 'generate' (greedy exact match of the first word) or 'score' (the answer ranks first
        among `candidates[relation]` by log-probability).
      candidates: {relation: answers} for 'score' (default: the answers found in `questions`).
      max_new_tokens: decoding budget for 'generate'.

    Returns:
      {'accuracy': float, 'correct': [bool per question]}.
    """
    if mode not in MODES:
        raise ValueError(f"fact accuracy mode must be one of {MODES}, got {mode!r}")
    if not questions:
        return {"accuracy": float("nan"), "correct": []}
    if mode == "generate":
        answers = generate_answers(
            model, tokenizer, [q["prompt"] for q in questions], max_new_tokens=max_new_tokens
        )
        correct = [a == q["answer"] for a, q in zip(answers, questions, strict=True)]
    else:
        cands = candidates or candidates_by_relation(questions)
        pairs, spans = [], []
        for q in questions:
            options = list(cands.get(q.get("relation", ""), []))
            if q["answer"] not in options:
                options.append(q["answer"])
            spans.append((len(pairs), options))
            pairs += [(q["prompt"], " " + o) for o in options]
        scores = score_continuations(model, tokenizer, pairs)
        correct = []
        for q, (start, options) in zip(questions, spans, strict=True):
            best = options[int(np.argmax(scores[start : start + len(options)]))]
            correct.append(best == q["answer"])
    return {"accuracy": float(np.mean(correct)), "correct": correct}
