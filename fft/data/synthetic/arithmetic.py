"""Multi-step arithmetic word problems with one integer answer: a verifiable RL task.

A problem starts a named person with some items and applies 2-4 steps (buy, give away, receive,
a gift from each of several friends), then asks how many items the person has:

    input   "Raren has 12 trozuks. Raren buys 5 more trozuks. Raren gives 3 trozuks to Zodrea.
             How many trozuks does Raren have now?"
    output  "12 + 5 = 17. 17 - 3 = 14. The answer is 14."
    answer  "14"

Counts never go negative. The answer is read from a completion by one stated rule,
`extract_answer`: the last integer in the text (an optional minus sign, then digits). The format
check, `has_answer_format`, asks that the completion end with "The answer is N." (the period and
trailing space optional). Names and nouns come from the world's lexicon, read only (no new words:
the lexicon, and so every other part of the world, is unchanged). Train / test problems are
disjoint by a hash of the problem text.
"""

from __future__ import annotations

import random
import re

from ._common import check_split, make_rng, split_of
from .lexicon import Lexicon, plural

TASK = "word_problem"
INSTRUCTIONS = ("Solve the problem.", "Solve the word problem.", "Work out the answer.")
_INTEGER = re.compile(r"-?\d+")
_FORMAT = re.compile(r"The answer is (-?\d+)\.?\s*$")


def extract_answer(text: str) -> int | None:
    """The last integer in `text` (optional '-' then digits), or None if it has none."""
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def has_answer_format(text: str) -> bool:
    """Whether `text` ends with "The answer is N." (N an integer; '.' and spaces optional)."""
    return _FORMAT.search(text.strip()) is not None


class Arithmetic:
    """Word-problem generator over a lexicon (read only)."""

    def __init__(self, lexicon: Lexicon, seed: int = 0):
        self.seed = seed
        self.names = [n for n in lexicon.names if len(n) <= 9][:200]
        self.nouns = [n for n in lexicon.nouns if len(n) <= 8][:200]

    def problem(self, rng: random.Random) -> tuple[str, str, int]:
        """(problem text, worked solution, answer)."""
        a, b = rng.sample(self.names, 2)
        items = plural(rng.choice(self.nouns))
        count = rng.randint(2, 20)
        text = [f"{a} has {count} {items}."]
        steps = []
        for _ in range(rng.randint(2, 3)):
            kind = rng.choice(("buy", "give", "get", "friends"))
            if kind == "give" and count == 0:
                kind = "buy"
            if kind == "buy":
                k = rng.randint(1, 15)
                text.append(f"{a} buys {k} more {items}.")
                steps.append(f"{count} + {k} = {count + k}.")
                count += k
            elif kind == "give":
                k = rng.randint(1, count)
                text.append(f"{a} gives {k} {items} to {b}.")
                steps.append(f"{count} - {k} = {count - k}.")
                count -= k
            elif kind == "get":
                k = rng.randint(1, 15)
                text.append(f"{b} gives {a} {k} {items}.")
                steps.append(f"{count} + {k} = {count + k}.")
                count += k
            else:
                m, k = rng.randint(2, 4), rng.randint(1, 5)
                text.append(f"Each of {m} friends gives {a} {k} {items}.")
                steps.append(f"{m} * {k} = {m * k}. {count} + {m * k} = {count + m * k}.")
                count += m * k
        text.append(f"How many {items} does {a} have now?")
        steps.append(f"The answer is {count}.")
        return " ".join(text), " ".join(steps), count

    def data(self, split: str, n: int) -> list[dict]:
        """`n` records `{instruction, input, output, answer, task}` of `split`.

        `output` is a worked solution ending in "The answer is N."; `answer` is N as a string.
        """
        check_split(split)
        rng = make_rng(self.seed, "arithmetic", split)
        out = []
        while len(out) < n:
            text, solution, answer = self.problem(rng)
            if split_of(TASK + "|" + text) != split:
                continue
            out.append(
                dict(
                    instruction=rng.choice(INSTRUCTIONS),
                    input=text,
                    output=solution,
                    answer=str(answer),
                    task=TASK,
                )
            )
        return out
