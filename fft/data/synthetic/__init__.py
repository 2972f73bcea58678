"""The synthetic world: deterministic data for measuring every fine-tuning method offline.

`World(seed)` generates, from the seed alone (pure Python, no network):

  general_corpus      documents from a probabilistic CFG over a generated lexicon (grammar.py)
  domain_corpus       legal / clinical / finance text with long compound terms (domains.py)
  fact_corpus         facts that change between eras, with cloze questions (facts.py)
  instruction_data    tasks with exact answers, held-out phrasings for test (instructions.py)
  chat_data           multi-turn dialogues built from those tasks
  preference_data     candidates ranked by a programmatic judge, with noise (preferences.py)
  pairwise_data       chosen / rejected pairs from the same judge
  reviews             sentiment classification with a held-out sentiment lexicon (reviews.py)
  arithmetic_problems multi-step word problems with one integer answer (arithmetic.py)

Every part draws from its own stream seeded by (seed, part name, split), so outputs are identical
across runs and machines, and train / test items are disjoint by construction. Records are plain
dicts ready to be written as JSONL (`python -m fft.data.synthetic --out DIR` writes them all).

Example:
    >>> w = World(0)
    >>> docs = w.general_corpus(100)
    >>> qs = w.fact_questions(era=1)      # [{'prompt': 'The capital of ... is', 'answer': ...}]
    >>> rec = w.instruction_data('train', 1)[0]
    >>> w.judge(rec, rec['output'] + '.') > w.judge(rec, 'wrong')
    True
"""

from __future__ import annotations

from .arithmetic import Arithmetic
from .domains import DOMAINS, Domains
from .facts import Facts
from .grammar import Grammar
from .instructions import PROMPT_TEMPLATE, TASKS, Instructions
from .lexicon import Lexicon
from .preferences import Preferences, judge, prompt_text, rank
from .reviews import LABEL_NAMES, Reviews

__all__ = ["World", "PROMPT_TEMPLATE", "TASKS", "DOMAINS", "LABEL_NAMES"]


class World:
    """A deterministic synthetic world generated from `seed` (see the module docstring).

    Attributes:
      seed: the seed.
      lexicon: the `Lexicon` (words by part of speech, sentiment words).
      domains: ('legal', 'clinical', 'finance').
      n_eras: number of fact eras.
      tasks: names of the instruction tasks.
      label_names: review labels ('negative', 'positive'); a review's `label_id` indexes it.
      prompt_template: the instruction prompt template (see `prompt_text`).
    """

    domains = DOMAINS
    tasks = TASKS
    label_names = LABEL_NAMES
    prompt_template = PROMPT_TEMPLATE

    def __init__(self, seed: int = 0):
        self.seed = seed
        # Built eagerly in a fixed order: later parts reserve new words in the shared lexicon,
        # so construction order is part of the world's definition.
        self.lexicon = Lexicon(seed)
        self._grammar = Grammar(self.lexicon, seed)
        self._domains = Domains(self._grammar, seed)
        self._facts = Facts(self._grammar, seed)
        self._instructions = Instructions(self._grammar, seed)
        self._preferences = Preferences(self._instructions, seed)
        self._reviews = Reviews(self._grammar, seed)
        self._arithmetic = Arithmetic(self.lexicon, seed)  # reads the lexicon, adds no words
        self.n_eras = self._facts.n_eras

    def __repr__(self) -> str:
        return f"World(seed={self.seed})"

    # -- general and domain text ---------------------------------------------------------------

    def general_corpus(self, n_docs: int, split: str = "train") -> list[str]:
        """General documents of 3-6 sentences.

        Args:
          n_docs: number of documents.
          split: 'train' or 'test' (disjoint; a document's split is fixed by its hash).
        Returns:
          a list of document strings; the first n of a larger call equal a smaller call.
        """
        return self._grammar.corpus(n_docs, split)

    def domain_corpus(self, domain: str, n_docs: int, split: str = "train") -> list[str]:
        """Documents of `domain` (one of `domains`): domain templates mixed with general text."""
        return self._domains.corpus(domain, n_docs, split)

    def domain_terms(self, domain: str) -> list[str]:
        """The compound terms of `domain`, sorted (candidates for vocabulary extension)."""
        return self._domains.domain_terms(domain)

    # -- facts ---------------------------------------------------------------------------------

    def fact_corpus(self, era: int, n_docs: int, split: str = "train") -> list[str]:
        """Documents stating the facts of `era` (0 <= era < n_eras), mixed with general text."""
        return self._facts.corpus(era, n_docs, split)

    def fact_questions(self, era: int) -> list[dict]:
        """Cloze questions for every fact as of `era`.

        Returns:
          dicts `{prompt, answer, era, changed, relation, subject}`, e.g. prompt
          "The capital of Veltoria is", answer "Marusk"; `changed` is True when the answer
          differs from the previous era's.
        """
        return self._facts.questions(era)

    def fact_table(self, era: int) -> dict:
        """`{(relation, subject): value}` as of `era`."""
        self._facts._check_era(era)
        return dict(self._facts.tables[era])

    # -- instructions and chat -----------------------------------------------------------------

    def instruction_data(self, split: str, n: int, tasks=None) -> list[dict]:
        """Instruction records `{instruction, input, output, task}`.

        Args:
          split: 'train' or 'test' (test: held-out instruction phrasings and unseen inputs).
          n: number of records.
          tasks: task names to draw from uniformly (default all of `tasks`).
        """
        return self._instructions.data(split, n, tasks)

    def apply_task(self, task: str, input_text: str) -> str:
        """The exact answer of `task` on `input_text` (what every record's output equals)."""
        return self._instructions.apply(task, input_text)

    def chat_data(self, split: str, n: int) -> list[dict]:
        """Dialogues `{'messages': [{'role': 'system'|'user'|'assistant', 'content': str}]}`:
        an optional system message, then 1-3 user/assistant turns (follow-ups may refer to the
        previous answer)."""
        return self._instructions.chat(split, n)

    @staticmethod
    def prompt_text(record: dict) -> str:
        """The prompt of an instruction record:
        "### Instruction: {instruction}\\n### Input: {input}\\n### Response: "."""
        return prompt_text(record)

    # -- preferences ---------------------------------------------------------------------------

    @staticmethod
    def judge(prompt_record: dict, response: str) -> float:
        """True reward of `response` to instruction record `prompt_record` (preferences.judge)."""
        return judge(prompt_record, response)

    @staticmethod
    def rank(prompt_record: dict, responses: list[str], noise: float = 0.0, rng=None) -> list[int]:
        """Indices of `responses` best-first by the judge; adjacent pairs flipped w.p. `noise`."""
        return rank(prompt_record, responses, noise, rng)

    def preference_data(self, split: str, n: int, k: int = 3, noise: float = 0.1) -> list[dict]:
        """Ranked records `{prompt, responses, ranking, order, instruction, input, output, task}`.

        `ranking[i]` is the rank of `responses[i]` (0 = best; fft.data.formats' 'ranking'
        convention); `order` lists response indices best-first (as `rank` returns). Noise flips
        adjacent pairs of the judge's order with probability `noise`.
        """
        return self._preferences.ranked(split, n, k, noise)

    def pairwise_data(self, split: str, n: int, noise: float = 0.1) -> list[dict]:
        """Pair records `{prompt, chosen, rejected, instruction, input, output, task}`."""
        return self._preferences.pairwise(split, n, noise)

    # -- reviews -------------------------------------------------------------------------------

    def reviews(self, split: str, n: int) -> list[dict]:
        """Labelled reviews `{text, label, label_id}`; label in `label_names`. The test split
        uses only held-out sentiment words (`heldout_sentiment_words`)."""
        return self._reviews.data(split, n)

    def review_prompts(self, split: str, n: int) -> list[dict]:
        """Controlled sentiment generation: `{prompt, task}` review openings to continue."""
        return self._reviews.continuation_prompts(split, n)

    def review_pairs(self, split: str, n: int, noise: float = 0.1) -> list[dict]:
        """`{prompt, chosen, rejected, task}`: the more positive continuation chosen."""
        return self._reviews.sentiment_pairs(split, n, noise)

    def sentiment_judge(self, prompt_record: dict, response: str) -> float:
        """True reward of a review continuation: its sentiment balance in [-1, 1)."""
        del prompt_record
        return self._reviews.sentiment_score(response)

    def heldout_sentiment_words(self) -> dict[str, list[str]]:
        """`{polarity: words}` used only by test reviews (but present in the general corpus)."""
        return {k: list(v) for k, v in self._reviews.heldout_words.items()}

    def train_sentiment_words(self) -> dict[str, list[str]]:
        """`{polarity: words}` used by training reviews."""
        return {k: list(v) for k, v in self._reviews.train_words.items()}

    # -- arithmetic word problems --------------------------------------------------------------

    def arithmetic_problems(self, split: str, n: int) -> list[dict]:
        """Word problems `{instruction, input, output, answer, task}` with an integer `answer`
        (a verifiable RL task: see arithmetic.py for the answer-extraction rule)."""
        return self._arithmetic.data(split, n)
