"""A programmatic judge (the true reward) and preference data ranked by it, with noise.

`judge(record, response)` scores a response to an instruction record (see instructions.py):

  correctness  1.0 if the response's words (a final period stripped) equal the exact answer,
               else 0.5 * token-overlap F1 with the answer (partial credit)
  style        +0.1 if the response ends with a period
               -0.1 if it repeats a word back to back (and the answer does not)
               -0.02 per word beyond the answer's length (at most -0.3): shorter is better

So "22." (1.1) > "22" (1.0) > "The answer is 22." (~0.65) > "23." (0.1). The period bonus is a
preference that SFT data does not show (its outputs have no period), which gives RLHF something
measurable to learn beyond correctness.

Preference data needs no policy: candidates are synthesised per record (correct, correct without
period, partially correct, wrong, verbose, repetitive), ranked by the judge, and adjacent pairs of
the ranking are flipped with probability `noise` to model annotator error.
"""

from __future__ import annotations

import random
from collections import Counter

from ._common import check_split, make_rng
from .instructions import PROMPT_TEMPLATE, TASKS, Instructions


def prompt_text(record: dict) -> str:
    """The prompt of an instruction record, in `PROMPT_TEMPLATE` (Alpaca style):
    "### Instruction: {instruction}\\n### Input: {input}\\n### Response: "."""
    return PROMPT_TEMPLATE.format(instruction=record["instruction"], input=record["input"])


def judge(record: dict, response: str) -> float:
    """The true reward of `response` for instruction `record` (needs `record['output']`).

    Args:
      record: an instruction record with the exact answer in 'output'.
      response: the model's (or a candidate's) response text.
    Returns:
      a float, higher is better: about 1.1 for a perfect answer, 0 for an unrelated one.
    """
    answer = record["output"].split()
    text = response.strip()
    period = text.endswith(".")
    words = (text[:-1] if period else text).split()
    if words == answer:
        correct = 1.0
    else:
        overlap = sum((Counter(words) & Counter(answer)).values())
        f1 = 2 * overlap / (len(words) + len(answer)) if overlap else 0.0
        correct = 0.5 * f1
    style = 0.1 if period else 0.0
    if _repeats(words) and not _repeats(answer):
        style -= 0.1
    style -= min(0.3, 0.02 * max(0, len(words) - len(answer)))
    return round(correct + style, 6)


def _repeats(words: list[str]) -> bool:
    return any(a == b for a, b in zip(words, words[1:], strict=False))


def rank(record: dict, responses: list[str], noise: float = 0.0, rng=None) -> list[int]:
    """Indices of `responses` best-first by `judge`, with noisy adjacent flips.

    Args:
      record: the instruction record the responses answer.
      responses: candidate responses.
      noise: probability of swapping each adjacent pair (one pass, best to worst).
      rng: anything with `.random()` (random.Random, numpy Generator); default Random(0).
    Returns:
      a permutation of range(len(responses)); with noise=0 sorted by judge (ties by index).
    """
    scores = [judge(record, r) for r in responses]
    order = sorted(range(len(responses)), key=lambda i: (-scores[i], i))
    if noise > 0:
        rng = rng if rng is not None else random.Random(0)
        for i in range(len(order) - 1):
            if rng.random() < noise:
                order[i], order[i + 1] = order[i + 1], order[i]
    return order


class Preferences:
    """Synthetic candidate responses and ranked / pairwise preference records."""

    def __init__(self, instructions: Instructions, seed: int = 0):
        self.ins, self.seed = instructions, seed

    def candidates(self, record: dict, rng: random.Random) -> list[str]:
        """Distinct candidate responses of graded quality for `record`."""
        ans = record["output"]
        words = ans.split()
        cands = [ans + ".", ans, self._partial(words, rng) + ".", self._partial(words, rng)]
        other = self.ins.make_input(record["task"], rng)
        cands.append(self.ins.apply(record["task"], other) + ".")  # right task, wrong input
        cands.append(rng.choice(self.ins.words) + ".")  # unrelated
        cands.append(
            rng.choice(("The answer is {}.", "Sure! It is {}.", "{}. I hope this helps.")).format(
                ans
            )
        )
        cands.append(f"{words[0]} {ans}.")  # repeated first word
        return list(dict.fromkeys(c for c in cands if c.strip()))

    def _partial(self, words: list[str], rng: random.Random) -> str:
        w = list(words)
        if len(w) == 1:
            x = w[0]
            if x.lstrip("-").isdigit():
                return str(int(x) + rng.choice((-2, -1, 1, 2)))
            return x[:-1] if len(x) > 2 else x + x
        op = rng.randrange(3)
        i = rng.randrange(len(w))
        if op == 0:
            del w[i]
        elif op == 1:
            j = (i + 1) % len(w)
            w[i], w[j] = w[j], w[i]
        else:
            w[i] = rng.choice(self.ins.words)
        return " ".join(w)

    def _records(self, split: str, n: int, name: str):
        check_split(split)
        # Own stream, so reward-model prompts are not the SFT prompts of instruction_data.
        rng = make_rng(self.seed, name, split)
        recs = [self.ins.record(rng.choice(TASKS), split, rng) for _ in range(n)]
        return rng, recs

    def ranked(self, split: str, n: int, k: int = 3, noise: float = 0.1) -> list[dict]:
        """`n` records `{prompt, responses, ranking, order, instruction, input, output, task}`.

        `responses` are k candidates; `ranking[i]` is the (noisy) rank of `responses[i]`, 0 = best
        (the convention of fft.data.formats' 'ranking' format); `order` is the same ranking as
        indices best-first (what `rank` returns).
        """
        rng, recs = self._records(split, n, "preferences")
        out = []
        for rec in recs:
            cands = self.candidates(rec, rng)
            responses = rng.sample(cands, min(k, len(cands)))
            order = rank(rec, responses, noise, rng)
            ranking = [order.index(i) for i in range(len(responses))]
            out.append(
                dict(prompt=prompt_text(rec), responses=responses, ranking=ranking, order=order)
                | rec
            )
        return out

    def pairwise(self, split: str, n: int, noise: float = 0.1) -> list[dict]:
        """`n` records `{prompt, chosen, rejected, instruction, input, output, task}`; the pair
        always differs in true reward, and is swapped with probability `noise`."""
        rng, recs = self._records(split, n, "pairwise")
        out = []
        for rec in recs:
            cands = self.candidates(rec, rng)
            while True:
                a, b = rng.sample(cands, 2)
                if judge(rec, a) != judge(rec, b):
                    break
            good, bad = (a, b) if judge(rec, a) > judge(rec, b) else (b, a)
            if rng.random() < noise:
                good, bad = bad, good
            out.append(dict(prompt=prompt_text(rec), chosen=good, rejected=bad, **rec))
        return out
