"""Generation exact match: greedy answers to held-out prompts, scored per task and overall.

    evaluate = make_exact_match_eval(records, "instruction", tokenizer)
    evaluate(model)  # {'exact_match': 0.83, 'exact_match/reverse': 0.9, ...}

Prompts are encoded exactly as training saw them (`fft.data.formats.encode_prompt`), left-padded
to one fixed length and cut into fixed-size batches, so `fft.sampling.generate_tokens` compiles
once and every later call (before, during, after training) reuses the compiled loop. Answers are
decoded up to the first EOS and compared with the reference after whitespace normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fft import sharding
from fft.config_lib import FFTError
from fft.data import formats
from fft.sampling import generate_tokens, left_pad


def reference_answer(record: dict, fmt: str) -> str:
    """The exact answer a record expects: `output`, `completion`, or the last assistant turn."""
    if fmt == "instruction":
        return str(record["output"])
    if fmt == "prompt_completion":
        return str(record["completion"])
    if fmt == "chat":
        messages = record.get("messages")
        if messages is None:  # ShareGPT
            messages = [
                {
                    "role": "assistant" if m.get("from") == "gpt" else m.get("from"),
                    "content": m["value"],
                }
                for m in record["conversations"]
            ]
        if not messages or messages[-1]["role"] != "assistant":
            raise FFTError("chat eval records must end with the assistant turn to match")
        return str(messages[-1]["content"])
    raise FFTError(
        f"exact match needs an instruction, chat or prompt_completion format, not {fmt!r}"
    )


def normalize(text: str) -> str:
    """Whitespace-insensitive form used for matching (runs of spaces/newlines -> one space)."""
    return " ".join(text.split())


def exact_match(
    predictions: Sequence[str],
    references: Sequence[str],
    groups: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """Fraction of predictions equal to their reference, overall and per group.

    Args:
      predictions: generated answers.
      references: the expected answers (same length).
      groups: an optional group name per example (e.g. the task); None entries count only overall.

    Returns:
      `{'exact_match': x}` plus `{'exact_match/<group>': x}` for every group seen.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hits = [normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)]
    out = {"exact_match": float(np.mean(hits)) if hits else 0.0}
    if groups is not None:
        by_group: dict[str, list[bool]] = {}
        for g, h in zip(groups, hits, strict=True):
            if g is not None:
                by_group.setdefault(str(g), []).append(h)
        for g in sorted(by_group):
            out[f"exact_match/{g}"] = float(np.mean(by_group[g]))
    return out


def make_exact_match_eval(
    records: Sequence[dict],
    fmt: str,
    tokenizer,
    *,
    template: str | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 0,
    max_prompt_len: int = 0,
    group_key: str = "task",
    on_predictions: Callable[[list[dict]], None] | None = None,
) -> Callable:
    """Builds `evaluate(model) -> {'exact_match': ..., 'exact_match/<task>': ...}`.

    Args:
      records: held-out records of `fmt` with their reference answers.
      fmt: 'instruction', 'chat' or 'prompt_completion'.
      tokenizer: the model's tokenizer (its EOS ends an answer).
      template: the instruction / chat template used in training (None = the default).
      batch_size: prompts per generation call (the last batch is padded with copies).
      max_new_tokens: answer budget; 0 = the longest reference answer in tokens + 4.
      max_prompt_len: keep at most this many trailing prompt tokens (0 = no limit).
      group_key: record field naming the group of per-group scores ('task').
      on_predictions: called with `[{prompt, response, reference, correct, group}]` after every
        evaluation (e.g. to write samples).

    Returns:
      The evaluate function (a model with `init_cache` / `decode` in, metric dict out).
    """
    if not records:
        raise FFTError("exact match eval got no records")
    prompts = [formats.encode_prompt(r, fmt, tokenizer, template=template) for r in records]
    if max_prompt_len:
        prompts = [p[-max_prompt_len:] for p in prompts]
    references = [reference_answer(r, fmt) for r in records]
    groups = [r.get(group_key) for r in records]
    if not max_new_tokens:
        max_new_tokens = max(len(tokenizer.encode(a)) for a in references) + 4
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else max(tokenizer.eos_id, 0)
    stops = (tokenizer.eos_id,) if tokenizer.eos_id >= 0 else ()
    # One prompt length for every batch: one compiled generation loop for the whole eval.
    prompt_len = max(len(p) for p in prompts)
    n = len(prompts)
    batch_size = min(batch_size, n)
    n_padded = -(-n // batch_size) * batch_size
    padded = prompts + [prompts[0]] * (n_padded - n)
    tokens_np, mask_np = left_pad(padded, pad)
    tokens_np = np.pad(
        tokens_np, ((0, 0), (prompt_len - tokens_np.shape[1], 0)), constant_values=pad
    )
    mask_np = np.pad(mask_np, ((0, 0), (prompt_len - mask_np.shape[1], 0)))

    def evaluate(model) -> dict[str, float]:
        answers: list[str] = []
        for start in range(0, n_padded, batch_size):
            out = generate_tokens(
                model,
                tokens_np[start : start + batch_size],
                mask_np[start : start + batch_size],
                max_new_tokens=max_new_tokens,
                stop_tokens=stops,
            )
            # Rows of a sharded model's output live on every process: gather before numpy.
            toks, lengths = sharding.to_host((out.tokens, out.lengths))
            for row, length in zip(toks, lengths, strict=True):
                ids = [int(t) for t in row[:length]]
                if stops and ids and ids[-1] in stops:
                    ids = ids[:-1]
                answers.append(tokenizer.decode(ids))
        answers = answers[:n]
        metrics = exact_match(answers, references, groups)
        if on_predictions is not None:
            on_predictions(
                [
                    {
                        "prompt": tokenizer.decode(p),
                        "response": a,
                        "reference": r,
                        "correct": normalize(a) == normalize(r),
                        "group": g,
                    }
                    for p, a, r, g in zip(prompts, answers, references, groups, strict=True)
                ]
            )
        return metrics

    return evaluate
