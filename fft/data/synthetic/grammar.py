"""The general grammar: a probabilistic CFG with number agreement, and the general corpus.

The grammar (`GRAMMAR`) is written as text rules `LHS -> RHS [weight] | RHS [weight]`. A rule with
`{n}` is instantiated for n in (sg, pl), which is how subject-verb agreement and determiner-noun
agreement are encoded ("the zorbit walks" / "these zorbits walk"). Symbols starting with `@` are
lexical categories filled from the `Lexicon` (nouns, verbs ... inflected for number and tense);
anything else that is not a left-hand side is a literal function word.

Expansion is depth-capped: past `max_depth` only the options of minimal derivation height are
used, so every sentence terminates and lengths stay in a learnable range (about 5-25 words).

Besides grammatical sentences, ~10% of general sentences are polarity statements that put a
sentiment adjective next to an anchor ("The glorful vanu was here, and everyone was happy."),
which is what lets a backbone pretrained on the general corpus classify reviews that use
sentiment words it never saw labelled.
"""

from __future__ import annotations

import random

from ._common import check_split, join_tokens, make_rng, split_of, weighted
from .lexicon import (
    CONJUNCTIONS,
    DETERMINERS_PL,
    DETERMINERS_SG,
    N_TOPICS,
    OBJECT_PRONOUNS,
    POLARITY_ANCHORS,
    PREPOSITIONS,
    PRONOUNS_PL,
    PRONOUNS_SG,
    SUBORDINATORS,
    Lexicon,
    past,
    plural,
    third_person,
)


def _alts(words) -> str:
    return " | ".join(f"{w} [1]" for w in words)


GRAMMAR = f"""
S -> CL . [6] | CL , CONJ CL . [1.5] | PP , CL . [1] | CL , SUB CL . [1] | @ADV , CL . [0.4]
CL -> SUBJ_sg VP_sg [1] | SUBJ_pl VP_pl [1]
SUBJ_{{n}} -> NP_{{n}} [6] | PRO_{{n}} [1]
NP -> NP_sg [1.2] | NP_pl [1] | OPRO [0.3]
NP_{{n}} -> DET_{{n}} NB_{{n}} [6]
NP_sg -> @NAME [1.5] | @PLACE [0.5]
NB_{{n}} -> @N_{{n}} [5] | @ADJ NB_{{n}} [2] | @N_{{n}} PP [1] | @N_{{n}} REL_{{n}} [0.8]
REL_{{n}} -> that VP_{{n}} [2] | that SUBJ_sg @TV_sg [0.5] | that SUBJ_pl @TV_pl [0.5]
VP_{{n}} -> @IV_{{n}} [3] | @IV_{{n}} @ADV [1] | @TV_{{n}} NP [4] | @TV_{{n}} NP PP [1.5] \
| @IV_{{n}} PP [1.5] | COP_{{n}} @ADJ [1.5] | COP_{{n}} very @ADJ [0.3] | COP_{{n}} PP [0.5] \
| @TV_{{n}} NP and @TV_{{n}} NP [0.4]
PP -> @PREP NP [1]
COP_sg -> is [2] | was [1]
COP_pl -> are [2] | were [1]
DET_sg -> {_alts(DETERMINERS_SG)}
DET_pl -> {_alts(DETERMINERS_PL)}
PRO_sg -> {_alts(PRONOUNS_SG)}
PRO_pl -> {_alts(PRONOUNS_PL)}
OPRO -> {_alts(OBJECT_PRONOUNS)}
CONJ -> {_alts(CONJUNCTIONS)}
SUB -> {_alts(SUBORDINATORS)}
"""


class PCFG:
    """A probabilistic CFG parsed from text rules, expanded with a depth cap.

    Args:
      text: rules, one `LHS -> RHS [w] | RHS [w]` per line (`\\` continues a line).
      lexical: `{'@CAT': f(rng, topic) -> str}` samplers for lexical categories.
      max_depth: beyond this depth only minimal-height options are chosen.
    """

    def __init__(self, text: str, lexical: dict, max_depth: int = 6):
        self.rules: dict[str, list[tuple[tuple[str, ...], float]]] = {}
        for line in text.replace("\\\n", " ").strip().splitlines():
            lhs, rhs = (s.strip() for s in line.split("->"))
            for n in ("sg", "pl") if "{n}" in line else (None,):
                name = lhs.replace("{n}", n) if n else lhs
                for alt in rhs.split("|"):
                    body, w = alt.rsplit("[", 1)
                    syms = tuple(s.replace("{n}", n) if n else s for s in body.split())
                    self.rules.setdefault(name, []).append((syms, float(w.rstrip("] "))))
        self.lexical = lexical
        self.max_depth = max_depth
        height = self._heights()
        self.options, self.base = {}, {}
        for lhs, alts in self.rules.items():
            self.options[lhs] = ([a for a, _ in alts], _cum([w for _, w in alts]))
            hs = [self._option_height(a, height) for a, _ in alts]
            base = [(a, w) for (a, w), h in zip(alts, hs, strict=True) if h == min(hs)]
            self.base[lhs] = ([a for a, _ in base], _cum([w for _, w in base]))

    def _option_height(self, syms, height) -> float:
        return 1 + max((height.get(s, 0) for s in syms if s in self.rules), default=0)

    def _heights(self) -> dict[str, float]:
        height = {lhs: float("inf") for lhs in self.rules}
        for _ in range(len(self.rules) + 1):  # fixed point of min-height derivations
            for lhs, alts in self.rules.items():
                height[lhs] = min(self._option_height(a, height) for a, _ in alts)
        bad = [s for s, h in height.items() if h == float("inf")]
        if bad:
            raise ValueError(f"grammar symbols never terminate: {bad}")
        return height

    def expand(self, symbol: str, rng: random.Random, topic: int | None = None) -> list[str]:
        """Expand `symbol` into a list of tokens (words and punctuation)."""
        out: list[str] = []
        stack = [(symbol, 0)]
        lexical, rules = self.lexical, self.rules
        while stack:
            sym, depth = stack.pop()
            if sym in rules:
                alts, cum = (self.base if depth >= self.max_depth else self.options)[sym]
                syms = alts[weighted(rng, cum)]
                stack.extend((s, depth + 1) for s in reversed(syms))
            elif sym[0] == "@":
                out.append(lexical[sym](rng, topic))
            else:
                out.append(sym)
        return out


def _cum(ws):
    out, t = [], 0.0
    for w in ws:
        t += w
        out.append(t)
    return out


def lexical_samplers(lex: Lexicon) -> dict:
    """The `@CAT` samplers used by `GRAMMAR`, with number and tense inflection."""
    nouns = lex.sampler("noun", lex.nouns)
    adjs = lex.sampler("adj", lex.adjectives)
    tv = lex.sampler("tv", [v for v in lex.verbs if v in lex.transitive])
    iv = lex.sampler("iv", [v for v in lex.verbs if v not in lex.transitive])
    names = lex.sampler("name", lex.names, topical=False)
    places = lex.sampler("place", lex.places, topical=False)
    advs = lex.sampler("adv", lex.adverbs, topical=False)

    def verb(sampler, number):
        def f(rng, topic):
            v = sampler(rng, topic)
            if rng.random() < 0.3:
                return past(v)  # past tense carries no agreement
            return third_person(v) if number == "sg" else v

        return f

    return {
        "@N_sg": nouns,
        "@N_pl": lambda rng, t: plural(nouns(rng, t)),
        "@ADJ": adjs,
        "@ADV": advs,
        "@NAME": names,
        "@PLACE": places,
        "@TV_sg": verb(tv, "sg"),
        "@TV_pl": verb(tv, "pl"),
        "@IV_sg": verb(iv, "sg"),
        "@IV_pl": verb(iv, "pl"),
        "@PREP": lambda rng, t: rng.choice(PREPOSITIONS),
    }


# Polarity statements: {W} is a sentiment adjective, {A} an anchor of the same polarity.
POLARITY_TEMPLATES = (
    "the {N} was {W} , and everyone was {A} .",
    "{W} things make people {A} .",
    "a {W} {N} is a {A} thing .",
    "people {A} {W} {NS} .",
    "{NAME} said that the {N} was {W} , which was {A} .",
    "the {W} {N} made {NAME} feel {A} .",
)
ANCHOR_SLOTS = {
    # anchor words that fit each template's {A} slot, by polarity
    "positive": (("happy", "glad", "pleased"), ("happy", "glad"), ("good",), ("love",)),
    "negative": (("sad", "angry", "upset"), ("sad", "angry"), ("bad",), ("hate",)),
}
_TEMPLATE_ANCHOR = (0, 1, 2, 3, 2, 0)  # which ANCHOR_SLOTS entry each template uses
assert set(POLARITY_ANCHORS) == set(ANCHOR_SLOTS)


class Grammar:
    """General-language generator over a `Lexicon`: sentences, polarity statements, documents."""

    def __init__(self, lex: Lexicon, seed: int = 0):
        self.lex, self.seed = lex, seed
        self.pcfg = PCFG(GRAMMAR, lexical_samplers(lex))
        self._noun = lex.sampler("noun", lex.nouns)

    def sentence_tokens(self, rng: random.Random, topic: int | None = None) -> list[str]:
        """One grammatical sentence as tokens (words and punctuation, lowercase)."""
        return self.pcfg.expand("S", rng, topic)

    def phrase(self, symbol: str, rng: random.Random, topic: int | None = None) -> str:
        """A phrase of any grammar symbol (e.g. 'NP', 'VP_sg', 'PP') as text, not capitalised."""
        return " ".join(self.pcfg.expand(symbol, rng, topic)).replace(" ,", ",")

    def polarity_sentence(self, rng: random.Random, word: str, polarity: str, topic=None) -> str:
        """A sentence whose anchor words reveal the polarity of sentiment adjective `word`."""
        i = rng.randrange(len(POLARITY_TEMPLATES))
        anchor = rng.choice(ANCHOR_SLOTS[polarity][_TEMPLATE_ANCHOR[i]])
        noun = self._noun(rng, topic)
        text = POLARITY_TEMPLATES[i].format(
            W=word, A=anchor, N=noun, NS=plural(noun), NAME=rng.choice(self.lex.names)
        )
        return join_tokens(text.split())

    def sentence(self, rng: random.Random, topic: int | None = None, p_polarity=0.1) -> str:
        """A general sentence: grammatical, or with prob `p_polarity` a polarity statement."""
        if rng.random() < p_polarity:
            pol = "positive" if rng.random() < 0.5 else "negative"
            return self.polarity_sentence(rng, rng.choice(self.lex.sentiment[pol]), pol, topic)
        return join_tokens(self.sentence_tokens(rng, topic))

    def document(self, rng: random.Random, n_sentences: tuple[int, int] = (3, 6)) -> str:
        """A document of a few sentences on one topic."""
        topic = rng.randrange(N_TOPICS)
        return " ".join(self.sentence(rng, topic) for _ in range(rng.randint(*n_sentences)))

    def corpus(self, n_docs: int, split: str = "train") -> list[str]:
        """`n_docs` general documents; train and test are disjoint by hash bucket (see _common)."""
        check_split(split)
        rng = make_rng(self.seed, "general", split)
        docs: list[str] = []
        while len(docs) < n_docs:
            doc = self.document(rng)
            if split_of(doc) == split:
                docs.append(doc)
        return docs
