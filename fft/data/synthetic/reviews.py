"""Labelled product reviews with a held-out sentiment lexicon (transfer learning).

The lexicon's sentiment adjectives (generated words such as 'chofurkant') are split per polarity:
two thirds are used by training reviews, one third ONLY by test reviews. A model trained from
scratch on the training reviews has never seen the held-out words and is at chance on them. All
sentiment words, held-out ones included, appear in the general corpus in polarity statements
("The vanu was chofurkant, and everyone was happy."), so a backbone pretrained on the general
corpus has learned their polarity and transfers.

Controlled sentiment generation (the RLHF task of Rafailov et al. 2023, Fig. 2, on IMDb): a
policy continues a review's neutral opening and "The <noun> was", and the true reward is
`sentiment_score` of the continuation, the positive-minus-negative balance of its sentiment
adjectives (the whole lexicon, held-out words included), a known rule standing in for a
sentiment classifier.
`continuation_prompts` gives the openings; `sentiment_pairs` gives preference pairs of two
synthesised continuations ordered by that score (with annotator noise), for DPO.

A review: a neutral opening, 2-3 sentiment sentences of the dominant polarity, sometimes one
sentence of the opposite polarity ("The lid was X, but ..."), sometimes a general sentence; the
label is the dominant polarity. Reviews contain no polarity anchor words ("good", "happy" ...),
so the label is only in the sentiment adjectives.
"""

from __future__ import annotations

import random
import re

from ._common import check_split, join_tokens, make_rng
from .grammar import Grammar

LABEL_NAMES = ("negative", "positive")

OPENINGS = (
    "i bought this {P} last week .",
    "we tried the {P} from {PLACE} .",
    "my friend {NAME} gave me a {P} .",
    "this is my second {P} .",
    "i used the {P} for a month .",
)
SENTIMENT = (
    "the {Q} was {W} .",
    "it felt {W} and {W2} .",
    "honestly , the {Q} is {W} .",
    "overall , the {P} is {W} .",
    "the {A} {Q} seemed {W} to me .",
    "i found the {P} {W} .",
)
CONTRAST = ("the {Q} was {W} , but that was all .", "only the {Q} was {W} .")


class Reviews:
    """Review generator with a train / held-out split of the sentiment lexicon."""

    def __init__(self, grammar: Grammar, seed: int = 0):
        self.grammar, self.seed = grammar, seed
        # Every sentiment adjective -> its polarity (the true reward of sentiment generation).
        self.polarity = {w: pol for pol in LABEL_NAMES for w in grammar.lex.sentiment[pol]}
        self.train_words, self.heldout_words = {}, {}
        for pol in LABEL_NAMES:
            words = list(grammar.lex.sentiment[pol])
            make_rng(seed, "reviews-split", pol).shuffle(words)
            cut = len(words) * 2 // 3
            self.train_words[pol], self.heldout_words[pol] = words[:cut], words[cut:]

    def review(self, rng: random.Random, label: str, words: dict[str, list[str]]) -> str:
        """One review of polarity `label` using sentiment words from `words[polarity]`."""
        lex = self.grammar.lex
        other = LABEL_NAMES[1 - LABEL_NAMES.index(label)]
        nouns = lex.nouns[:400]
        slots = self._slots(rng)
        body = [(rng.choice(SENTIMENT), label) for _ in range(rng.randint(2, 3))]
        if rng.random() < 0.3:
            body.append((rng.choice(CONTRAST), other))
        rng.shuffle(body)
        out = [join_tokens(rng.choice(OPENINGS).format(**slots).split())]
        for template, pol in body:
            w = rng.sample(words[pol], 2)
            text = template.format(
                W=w[0], W2=w[1], Q=rng.choice(nouns), A=rng.choice(lex.adjectives[:200]), **slots
            )
            out.append(join_tokens(text.split()))
        if rng.random() < 0.3:
            out.insert(rng.randrange(1, len(out) + 1), self.grammar.sentence(rng, p_polarity=0))
        return " ".join(out)

    def sentiment_score(self, text: str) -> float:
        """(pos - neg) / (pos + neg + 1) over the sentiment adjectives of `text`: 0 without any,
        1/2 for one positive, approaching 1 with more positive and no negative ones."""
        found = [self.polarity.get(w) for w in re.findall(r"[a-z]+", text.lower())]
        pos, neg = found.count("positive"), found.count("negative")
        return (pos - neg) / (pos + neg + 1)

    def _slots(self, rng: random.Random) -> dict[str, str]:
        """The product, place and name a review's templates refer to."""
        lex = self.grammar.lex
        return dict(
            P=rng.choice(lex.nouns[:400]), PLACE=rng.choice(lex.places), NAME=rng.choice(lex.names)
        )

    def _opening(self, rng: random.Random) -> str:
        return join_tokens(rng.choice(OPENINGS).format(**self._slots(rng)).split())

    def _prompt(self, rng: random.Random) -> str:
        # The opening, then "The <noun> was": the general corpus continues that with an
        # adjective (a sentiment one about a third of the time, either polarity), so the base
        # model's continuations are balanced and the policy has a choice to learn.
        return f"{self._opening(rng)} The {rng.choice(self.grammar.lex.nouns[:400])} was"

    def continuation_prompts(self, split: str, n: int) -> list[dict]:
        """`n` records `{prompt, task}`: a review's opening and "The <noun> was" to continue."""
        check_split(split)
        rng = make_rng(self.seed, "review-prompts", split)
        return [dict(prompt=self._prompt(rng), task="review_sentiment") for _ in range(n)]

    def sentiment_pairs(self, split: str, n: int, noise: float = 0.1) -> list[dict]:
        """`n` records `{prompt, chosen, rejected, task}`: two synthesised continuations of one
        opening, the one with the higher `sentiment_score` chosen (flipped w.p. `noise`)."""
        check_split(split)
        rng = make_rng(self.seed, "review-pairs", split)
        words = self.train_words if split == "train" else self.heldout_words
        out = []
        while len(out) < n:
            prompt = self._prompt(rng)
            a, b = (self._continuation(rng, words) for _ in range(2))
            sa, sb = self.sentiment_score(a), self.sentiment_score(b)
            if sa == sb:
                continue
            chosen, rejected = (a, b) if sa > sb else (b, a)
            if rng.random() < noise:
                chosen, rejected = rejected, chosen
            out.append(
                dict(prompt=prompt, chosen=chosen, rejected=rejected, task="review_sentiment")
            )
        return out

    def _continuation(self, rng: random.Random, words: dict[str, list[str]]) -> str:
        """A space, an adjective and a period, then 0-2 review sentences (each part of a random
        polarity, so two continuations usually differ in sentiment)."""
        lex = self.grammar.lex
        nouns = lex.nouns[:400]
        out = [" " + rng.choice(words[rng.choice(LABEL_NAMES)]) + "."]
        for _ in range(rng.randint(0, 2)):
            pol = rng.choice(LABEL_NAMES)
            w = rng.sample(words[pol], 2)
            text = rng.choice(SENTIMENT).format(
                W=w[0],
                W2=w[1],
                Q=rng.choice(nouns),
                A=rng.choice(lex.adjectives[:200]),
                P=rng.choice(nouns),
            )
            out.append(" " + join_tokens(text.split()))
        return "".join(out)

    def data(self, split: str, n: int) -> list[dict]:
        """`n` reviews `{text, label, label_id}` of `split`, labels balanced at random.

        The test split uses only held-out sentiment words, the train split only the others.
        """
        check_split(split)
        rng = make_rng(self.seed, "reviews", split)
        words = self.train_words if split == "train" else self.heldout_words
        out = []
        for _ in range(n):
            label_id = rng.randrange(len(LABEL_NAMES))
            label = LABEL_NAMES[label_id]
            out.append(dict(text=self.review(rng, label, words), label=label, label_id=label_id))
        return out
