"""Time-stamped facts that change between eras (continual pre-training, forgetting).

There are four relations over generated entities:

  capital   country -> city      "The capital of Veltoria is Marusk."
  currency  country -> coin      "The currency of Veltoria is the drabo."
  chief     guild   -> person    "The chief of the Orvan guild is Pelit."
  captain   team    -> person    "The captain of the Sekar team is Tomisa."

Era 0 assigns every fact a value; each later era changes `CHANGE_FRACTION` of the facts to a value
the fact never had before (capitals stay unique within an era). `fact_corpus(era)` states the facts
of that era in varied phrasings, mixed with general sentences; in eras >= 1 changed facts are
stated three times as often as unchanged ones (news is about what changed). `fact_questions(era)`
gives one cloze per fact, whose answer is the value's single word.
"""

from __future__ import annotations

import random

from ._common import check_split, join_tokens, make_rng, split_of
from .grammar import Grammar
from .lexicon import make_word

N_ERAS = 4
CHANGE_FRACTION = 0.3
N_SUBJECTS = 24  # per subject kind (countries, guilds, teams)

# relation -> (cloze prompt, statement phrasings); {S} subject, {V} value. The first phrasing is
# the cloze completed, so the question form is always seen in training text.
RELATIONS = {
    "capital": (
        "The capital of {S} is",
        (
            "The capital of {S} is {V} .",
            "{V} is the capital of {S} .",
            "In {S} , the capital is {V} .",
            "{S} has its capital at {V} .",
            "The government of {S} sits in {V} , the capital .",
        ),
    ),
    "currency": (
        "The currency of {S} is the",
        (
            "The currency of {S} is the {V} .",
            "In {S} , people pay with the {V} .",
            "The {V} is the currency of {S} .",
            "Prices in {S} are given in the {V} , the currency .",
        ),
    ),
    "chief": (
        "The chief of the {S} guild is",
        (
            "The chief of the {S} guild is {V} .",
            "{V} is the chief of the {S} guild .",
            "The {S} guild is led by {V} , its chief .",
            "Members of the {S} guild answer to {V} , their chief .",
        ),
    ),
    "captain": (
        "The captain of the {S} team is",
        (
            "The captain of the {S} team is {V} .",
            "{V} is the captain of the {S} team .",
            "The {S} team is captained by {V} .",
            "Fans of the {S} team cheer for {V} , the captain .",
        ),
    ),
}


class Facts:
    """The fact tables of every era and the corpora / cloze questions built from them."""

    def __init__(self, grammar: Grammar, seed: int = 0, n_eras: int = N_ERAS):
        self.grammar, self.seed, self.n_eras = grammar, seed, n_eras
        lex = grammar.lex
        rng = make_rng(seed, "facts")
        countries = lex.places[-N_SUBJECTS:]
        cities = lex.places[:-N_SUBJECTS][:120]
        people = lex.names[-150:]
        guilds = [lex.new_word(lambda: make_word(rng, 2).capitalize()) for _ in range(N_SUBJECTS)]
        teams = [lex.new_word(lambda: make_word(rng, 2).capitalize()) for _ in range(N_SUBJECTS)]
        coins = [lex.new_word(lambda: make_word(rng, 2) + "o") for _ in range(60)]
        self.subjects = {"capital": countries, "currency": countries, "chief": guilds}
        self.subjects["captain"] = teams
        pools = {"capital": cities, "currency": coins, "chief": people, "captain": people}
        self.keys = [(r, s) for r in RELATIONS for s in self.subjects[r]]

        # tables[era][(relation, subject)] -> value
        table: dict = {}
        for rel, subj in self.keys:
            taken = {v for (r, _), v in table.items() if r == rel} if rel == "capital" else set()
            table[rel, subj] = rng.choice([v for v in pools[rel] if v not in taken])
        self.tables = [table]
        history = {k: {v} for k, v in table.items()}
        for _ in range(1, n_eras):
            table = dict(table)
            for key in rng.sample(self.keys, round(CHANGE_FRACTION * len(self.keys))):
                rel = key[0]
                used = set(table.values()) if rel == "capital" else set()
                options = [v for v in pools[rel] if v not in history[key] and v not in used]
                table[key] = rng.choice(options)
                history[key].add(table[key])
            self.tables.append(table)

    def _check_era(self, era: int) -> None:
        if not 0 <= era < self.n_eras:
            raise ValueError(f"era must be in [0, {self.n_eras}), got {era}")

    def changed(self, era: int) -> set:
        """Keys `(relation, subject)` whose value differs from the previous era (empty for 0)."""
        self._check_era(era)
        if era == 0:
            return set()
        return {k for k in self.keys if self.tables[era][k] != self.tables[era - 1][k]}

    def statement(self, rng: random.Random, key, era: int) -> str:
        """One sentence stating fact `key` as of `era`, in a random phrasing."""
        rel, subj = key
        phrasing = rng.choice(RELATIONS[rel][1])
        return join_tokens(phrasing.format(S=subj, V=self.tables[era][key]).split())

    def document(self, rng: random.Random, era: int) -> str:
        """2-4 fact statements of `era` mixed with 1-3 general sentences."""
        changed = self.changed(era)
        weights = [3.0 if k in changed else 1.0 for k in self.keys]
        keys = rng.choices(self.keys, weights=weights, k=rng.randint(2, 4))
        sents = [self.statement(rng, k, era) for k in keys]
        topic = rng.randrange(16)
        sents += [self.grammar.sentence(rng, topic) for _ in range(rng.randint(1, 3))]
        rng.shuffle(sents)
        return " ".join(sents)

    def corpus(self, era: int, n_docs: int, split: str = "train") -> list[str]:
        """`n_docs` documents stating the facts of `era`; train/test disjoint by hash bucket."""
        self._check_era(era)
        check_split(split)
        rng = make_rng(self.seed, "facts", era, split)
        docs: list[str] = []
        while len(docs) < n_docs:
            doc = self.document(rng, era)
            if split_of(doc) == split:
                docs.append(doc)
        return docs

    def questions(self, era: int) -> list[dict]:
        """One cloze per fact as of `era`.

        Returns:
          dicts `{prompt, answer, era, changed, relation, subject}`; `prompt` is a cloze such as
          "The capital of Veltoria is" and `answer` the single word that completes it;
          `changed` is True when the answer differs from era - 1.
        """
        changed = self.changed(era)
        return [
            dict(
                prompt=RELATIONS[rel][0].format(S=subj),
                answer=self.tables[era][rel, subj],
                era=era,
                changed=(rel, subj) in changed,
                relation=rel,
                subject=subj,
            )
            for rel, subj in self.keys
        ]
