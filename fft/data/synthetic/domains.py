"""Domain corpora (legal, clinical, finance): their own long compound vocabulary and phrasing.

Each domain has term classes (clinical: drugs, conditions, procedures ...), each built from domain
morphemes: prefix + (middle) + class suffix, e.g. 'pharmacokinetovarex' (a drug) or
'hepatothrombitis' (a condition). A tokenizer trained on the general corpus has never seen these
morphemes together, so it splits every term into many pieces; extending the vocabulary with
`domain_terms(domain)` is what fixes `tokens_per_doc`. The suffix carries the class, so a model can
learn which slot of a template a term fits.

Documents mix domain templates (~70% of sentences, each with its own function words: "pursuant",
"dosage", "yield" ...) with general grammar sentences (~30%), and general noun phrases fill some
template slots, so domain text is grounded in the general language.
"""

from __future__ import annotations

import random

from ._common import Zipf, check_split, join_tokens, make_rng, split_of
from .grammar import Grammar

DOMAINS = ("legal", "clinical", "finance")

# domain -> (prefixes, middles, {term class: suffixes})
MORPHEMES = {
    "clinical": (
        ("pharmaco", "cardio", "neuro", "hepato", "nephro", "gastro", "hemato", "immuno", "onco")
        + ("dermato", "pulmo", "endo", "arthro"),
        ("kineto", "vaso", "lipo", "glyco", "thrombo", "myo", "osteo", "cyto", "angio", "fibro"),
        {
            "DRUG": ("varex", "itol", "azine", "omab", "ostatin", "iprazole", "ocillin"),
            "COND": ("itis", "emia", "opathy", "osis", "algia"),
            "PROC": ("ectomy", "ography", "oscopy", "otomy"),
        },
    ),
    "legal": (
        ("juris", "contra", "indemni", "fiduci", "subro", "arbitro", "estoppo", "litiga", "tortio")
        + ("convey", "usufructo", "quasi", "testamen"),
        ("preclu", "adjudi", "stipu", "remedi", "manda", "procu", "dispo", "encumbra", "warra"),
        {
            "DOCTRINE": ("ation", "ancy", "itude", "ence"),
            "DOC": ("ment", "orium", "ature", "icle"),
            "PARTY": ("ator", "ee", "ant", "ary"),
        },
    ),
    "finance": (
        ("amorti", "securi", "deriva", "hedgo", "capita", "liqui", "arbitra", "collatero")
        + ("divido", "fiscu", "moneta", "credito", "equito"),
        ("zato", "tiza", "vola", "rebalo", "levero", "coupo", "yieldo", "spreado", "maturo"),
        {
            "INSTR": ("ex", "ium", "ocap", "ible", "ond"),
            "METRIC": ("ization", "ance", "ometry", "ility"),
            "ENTITY": ("corp", "fund", "bank", "trust"),
        },
    ),
}

TEMPLATES = {
    "clinical": (
        "the patient was given {DRUG} for {COND} .",
        "{DRUG} reduced the symptoms of {COND} within {NUM} days .",
        "after the {PROC} , the dosage of {DRUG} was raised to {NUM} mg .",
        "dr {NAME} recommended {PROC} for patients with {COND} .",
        "chronic {COND} is treated with {DRUG} and {DRUG} .",
        "the {PROC} showed signs of {COND} in {NP} .",
        "adverse reactions to {DRUG} include {COND} and {COND} .",
        "patients with {COND} should avoid {DRUG} .",
        "a {PROC} is indicated when {COND} persists after {NUM} weeks .",
    ),
    "legal": (
        "pursuant to the {DOC} , the {PARTY} shall pay {NUM} crowns .",
        "the court held that {DOCTRINE} applies to {NP} .",
        "under the doctrine of {DOCTRINE} , the {PARTY} may not claim {NP} .",
        "the {PARTY} filed a {DOC} against {NAME} .",
        "hereinafter , the {DOC} shall govern all {DOCTRINE} .",
        "the judge in {PLACE} dismissed the claim of {DOCTRINE} .",
        "any breach of the {DOC} voids the {DOCTRINE} of the {PARTY} .",
        "the {PARTY} and the {PARTY} signed the {DOC} on day {NUM} .",
        "notwithstanding {DOCTRINE} , the {DOC} remains in force .",
    ),
    "finance": (
        "the {INSTR} yield rose by {NUM} percent .",
        "analysts expect the {METRIC} of the {INSTR} to fall in {PLACE} .",
        "{ENTITY} reported {METRIC} of {NUM} million .",
        "the board of {ENTITY} approved the {INSTR} .",
        "investors sold the {INSTR} as {METRIC} increased .",
        "quarterly {METRIC} at {ENTITY} beat the forecast by {NUM} percent .",
        "{ENTITY} hedged {NP} with the {INSTR} .",
        "the {INSTR} of {ENTITY} matures in {NUM} months .",
        "higher {METRIC} pushed {ENTITY} to issue the {INSTR} .",
    ),
}

TERMS_PER_CLASS = 60


class Domains:
    """Domain vocabularies and corpora over a general `Grammar`."""

    def __init__(self, grammar: Grammar, seed: int = 0):
        self.grammar, self.seed = grammar, seed
        self.terms: dict[str, dict[str, list[str]]] = {}
        for domain in DOMAINS:
            rng = make_rng(seed, "domain-terms", domain)
            prefixes, middles, classes = MORPHEMES[domain]
            self.terms[domain] = {}
            for cls, suffixes in classes.items():
                words: list[str] = []
                while len(words) < TERMS_PER_CLASS:
                    # Always a middle morpheme (long compounds), sometimes two.
                    mid = rng.choice(middles) + (rng.choice(middles) if rng.random() < 0.25 else "")
                    w = rng.choice(prefixes) + mid + rng.choice(suffixes)
                    if w not in grammar.lex.taken:
                        grammar.lex.taken.add(w)
                        words.append(w)
                self.terms[domain][cls] = words
        self._samplers = {
            (d, c): Zipf(ws, a=0.9) for d, cs in self.terms.items() for c, ws in cs.items()
        }

    def domain_terms(self, domain: str) -> list[str]:
        """All compound terms of `domain` (sorted), e.g. to extend a tokenizer's vocabulary."""
        _check_domain(domain)
        return sorted(w for ws in self.terms[domain].values() for w in ws)

    def sentence(self, domain: str, rng: random.Random, topic: int | None = None) -> str:
        """One domain-template sentence with its slots filled."""
        out = []
        for tok in rng.choice(TEMPLATES[domain]).split():
            if tok[0] != "{":
                out.append(tok)
            elif tok == "{NUM}":
                out.append(str(rng.randint(2, 500)))
            elif tok == "{NP}":
                out.append(self.grammar.phrase("NP", rng, topic))
            elif tok == "{NAME}":
                out.append(rng.choice(self.grammar.lex.names))
            elif tok == "{PLACE}":
                out.append(rng.choice(self.grammar.lex.places))
            else:
                out.append(self._samplers[domain, tok[1:-1]](rng))
        return join_tokens(out)

    def document(self, domain: str, rng: random.Random, p_general: float = 0.3) -> str:
        """A domain document of 3-7 sentences, ~`p_general` of them general grammar."""
        topic = rng.randrange(16)
        sents = [
            self.grammar.sentence(rng, topic)
            if rng.random() < p_general
            else self.sentence(domain, rng, topic)
            for _ in range(rng.randint(3, 7))
        ]
        return " ".join(sents)

    def corpus(self, domain: str, n_docs: int, split: str = "train") -> list[str]:
        """`n_docs` documents of `domain`; train/test disjoint by hash bucket."""
        _check_domain(domain)
        check_split(split)
        rng = make_rng(self.seed, "domain", domain, split)
        docs: list[str] = []
        while len(docs) < n_docs:
            doc = self.document(domain, rng)
            if split_of(doc) == split:
                docs.append(doc)
        return docs


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
