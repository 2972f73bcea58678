"""The generated lexicon: pronounceable syllable-built words by part of speech, plus function words.

Words are built from onset + nucleus + coda syllables; each part of speech has its own shape so
that morphology carries signal a small LM can learn (adjectives end in -ish/-ous/-al/-ine/-ic,
adverbs are adjective + -ly, names and places are capitalised with their own endings). Inflection
is regular English-like: plural and 3rd-person singular add -s (-es after s/x/z/sh/ch), past adds
-ed (-d after e).

Every content word also has a topic (one of `N_TOPICS`); documents pick a topic and prefer its
words, which gives document-level coherence on top of sentence grammar.

Sentiment adjectives (positive / negative) are a separate class: they appear in the general
corpus next to polarity anchors ("good", "happy", "love" ...) and are split into words used by
training reviews and held-out words used only by test reviews (see reviews.py).
"""

from __future__ import annotations

import random

from ._common import Zipf, make_rng

N_TOPICS = 16

# Function words are plain English so prompts and instructions read naturally.
DETERMINERS_SG = ("the", "a", "every", "this", "that", "one")
DETERMINERS_PL = ("the", "some", "these", "those", "many", "two", "three", "few")
PRONOUNS_SG = ("he", "she", "it")
PRONOUNS_PL = ("they", "we")
OBJECT_PRONOUNS = ("him", "her", "it", "them", "us")
PREPOSITIONS = ("in", "on", "near", "under", "with", "from", "behind", "beside", "across", "for")
CONJUNCTIONS = ("and", "but", "so")
SUBORDINATORS = ("because", "while", "although", "when")
POLARITY_ANCHORS = {
    "positive": ("good", "happy", "glad", "love", "best", "pleased"),
    "negative": ("bad", "sad", "angry", "hate", "worst", "upset"),
}
FUNCTION_WORDS = frozenset(
    DETERMINERS_SG
    + DETERMINERS_PL
    + PRONOUNS_SG
    + PRONOUNS_PL
    + OBJECT_PRONOUNS
    + PREPOSITIONS
    + CONJUNCTIONS
    + SUBORDINATORS
    + POLARITY_ANCHORS["positive"]
    + POLARITY_ANCHORS["negative"]
    + ("is", "are", "was", "were", "that", "who", "not", "of", "to", "it", "everyone", "people")
    + ("nobody", "things", "thing", "so", "very", "made", "makes", "feel", "felt", "really")
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr")
_ONSETS += ("gr", "kl", "pl", "st", "tr", "sk", "sh", "th", "ch", "fl", "")
_NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou", "ea", "ie")
_CODAS = ("", "", "", "n", "r", "l", "s", "t", "k", "m", "nd", "rk", "st", "lt")
_ADJ_SUFFIXES = ("ish", "ous", "al", "ine", "ic", "y")
_NAME_ENDINGS = ("a", "o", "en", "is", "ar", "ik", "et", "an")
_PLACE_ENDINGS = ("ia", "or", "und", "esh", "ara", "ost", "mir", "ovia")

# Sizes of each part of speech ("a few thousand words").
SIZES = dict(nouns=1500, verbs=500, adjectives=500, names=300, places=300, sentiment=160)


def syllable(rng: random.Random, onsets=_ONSETS, nuclei=_NUCLEI, codas=_CODAS) -> str:
    """One onset + nucleus + coda syllable."""
    return rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas)


def make_word(rng: random.Random, n_syll: int, **inventory) -> str:
    """A pronounceable word of `n_syll` syllables (codas only word-finally, to stay readable)."""
    onsets = inventory.get("onsets", _ONSETS)
    nuclei = inventory.get("nuclei", _NUCLEI)
    parts = []
    for _ in range(n_syll - 1):
        # Inner syllables are open (consonant + single vowel) so words stay short and readable.
        parts.append((rng.choice(onsets) or "l") + rng.choice(nuclei)[0])
    parts.append(syllable(rng, **inventory))
    return "".join(parts)


def plural(noun: str) -> str:
    """Regular plural: -es after sibilants, else -s."""
    return noun + ("es" if noun.endswith(("s", "x", "z", "sh", "ch")) else "s")


def third_person(verb: str) -> str:
    """3rd-person singular present: the same rule as the plural."""
    return plural(verb)


def past(verb: str) -> str:
    """Regular past tense: -d after e, else -ed."""
    return verb + ("d" if verb.endswith("e") else "ed")


class Lexicon:
    """The world's words, generated from `seed`.

    Attributes:
      nouns, verbs, adjectives, adverbs: lowercase content words (verbs in base form).
      transitive: set of verbs that take an object (the rest are intransitive).
      names, places: capitalised proper nouns.
      sentiment: {'positive': [...], 'negative': [...]} sentiment adjectives.
      topic: word -> topic id in [0, N_TOPICS).
      taken: every word generated so far (other parts reserve new words through `new_word`).
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._rng = make_rng(seed, "lexicon")
        self.taken: set[str] = set(FUNCTION_WORDS)
        # Inflected forms must not collide with other words either.
        rng = self._rng
        self.nouns = self._many(SIZES["nouns"], lambda: make_word(rng, rng.choice((1, 2, 2, 2, 3))))
        self.verbs = self._many(SIZES["verbs"], lambda: make_word(rng, rng.choice((1, 2, 2))))
        self.adjectives = self._many(
            SIZES["adjectives"],
            lambda: make_word(rng, rng.choice((1, 2))) + rng.choice(_ADJ_SUFFIXES),
        )
        self.adverbs = [a + "ly" for a in self.adjectives[:100]]
        self.taken.update(self.adverbs)
        self.names = self._many(
            SIZES["names"], lambda: make_word(rng, rng.choice((1, 2))) + rng.choice(_NAME_ENDINGS)
        )
        self.names = [n.capitalize() for n in self.names]
        self.places = self._many(
            SIZES["places"], lambda: make_word(rng, rng.choice((1, 2))) + rng.choice(_PLACE_ENDINGS)
        )
        self.places = [p.capitalize() for p in self.places]
        n_sent = SIZES["sentiment"]
        sent = self._many(
            n_sent, lambda: make_word(rng, 2) + rng.choice(("ful", "ant", "id", "ent"))
        )
        self.sentiment = {"positive": sent[: n_sent // 2], "negative": sent[n_sent // 2 :]}
        self.transitive = set(self.verbs[::3] + self.verbs[1::3])  # two thirds transitive
        self.topic = {w: rng.randrange(N_TOPICS) for w in self.nouns + self.verbs + self.adjectives}
        self._samplers: dict = {}

    def new_word(self, make) -> str:
        """Draw words from `make()` until one is unused (and whose inflections are unused)."""
        for _ in range(1000):
            w = make()
            forms = {w, w.lower(), plural(w.lower()), past(w.lower())}
            if len(w) >= 3 and not forms & self.taken:
                self.taken.update(forms)
                return w
        raise RuntimeError("lexicon: could not find an unused word; inventory too small")

    def _many(self, n: int, make) -> list[str]:
        return [self.new_word(make) for _ in range(n)]

    # -- sampling ------------------------------------------------------------------------------

    def sampler(self, name: str, words: list[str], topical: bool = True):
        """A sampler `f(rng, topic) -> word`: Zipfian over `words`, half the time from `topic`."""
        if name not in self._samplers:
            glob = Zipf(words, a=1.0)
            by_topic = [
                Zipf([w for w in words if self.topic.get(w) == t] or words, a=0.8)
                for t in range(N_TOPICS)
            ]

            def sample(rng: random.Random, topic: int | None = None) -> str:
                if topical and topic is not None and rng.random() < 0.5:
                    return by_topic[topic](rng)
                return glob(rng)

            self._samplers[name] = sample
        return self._samplers[name]

    def translation_vocab(self) -> dict[str, list[str]]:
        """The small, frequent vocabulary the translation task draws from (by part of speech)."""
        return {
            "noun": self.nouns[:80],
            "adj": self.adjectives[:40],
            "verb": [v for v in self.verbs[:90] if v in self.transitive][:40],
        }
