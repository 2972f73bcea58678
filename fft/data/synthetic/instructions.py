"""Instruction tasks with exact answers, and multi-turn chat built from them.

Every task is a pure function of the record's `input` (`Instructions.apply(task, input)`), so
exact match is well defined and every output can be recomputed. Tasks:

  translate    into the generated second language: word-by-word lexicon, then two order rules
               (an adjective follows its noun; the verb moves to the end)
  reverse      words in reverse order            sort         words alphabetically
  count        number of words                   occurrences  how often `word:` occurs in `text:`
  arithmetic   "a + b" / "a - b", small numbers  extract      a field of a "key: value; ..." record
  uppercase    words upper-cased                 copy         the input unchanged
  first_word / last_word                         max          the largest of a list of numbers
  dedupe       drop repeated words (first kept)  plural       pluralise each noun
  longest      the longest word (first of ties)

Inputs are short (outputs <= 12 words). Each task has training phrasings of its instruction and
held-out test phrasings (`TEMPLATES[task] = (train, test)`); the test split also gets fresh inputs
(an input's split is fixed by a hash of `task + input`, so train and test inputs never overlap).
A test phrasing is a sentence never seen in training that keeps the task's key word from the
training phrasings ("Write the words in reverse order." for "Reverse the words."): the base
models here are pretrained on the synthetic language, not English, so they cannot know that
"opposite" means "reverse" — the held-out phrasings test that tuning generalises beyond the
memorised instruction strings, not English synonyms.

`PROMPT_TEMPLATE` is the Alpaca-style prompt used for preference data and `World.prompt_text`.
"""

from __future__ import annotations

import random

from ._common import check_split, make_rng, split_of
from .grammar import Grammar
from .lexicon import make_word, plural, third_person

# The prompt part of fft.data.formats.DEFAULT_INSTRUCTION_TEMPLATE (see its docstring).
PROMPT_TEMPLATE = "### Instruction: {instruction}\n### Input: {input}\n### Response: "

# task -> (training phrasings, held-out test phrasings)
TEMPLATES = {
    "translate": (
        (
            "Translate the sentence into Veltic.",
            "Give the Veltic translation.",
            "Translate to Veltic.",
            "Render this sentence in Veltic.",
            "What is this in Veltic?",
        ),
        ("Convert the sentence into the Veltic language.", "Say this in Veltic."),
    ),
    "reverse": (
        (
            "Reverse the order of the words.",
            "Write the words backwards.",
            "Reverse the words.",
            "List the words from last to first.",
            "Put the words in reverse.",
        ),
        ("Write the words in reverse order.", "Give the words backwards, please."),
    ),
    "sort": (
        (
            "Sort the words alphabetically.",
            "Put the words in alphabetical order.",
            "Sort these words.",
            "Arrange the words from a to z.",
            "Alphabetize the words.",
        ),
        ("Put the words in sorted order.", "Order the words alphabetically."),
    ),
    "count": (
        (
            "Count the words.",
            "How many words are there?",
            "Give the number of words.",
            "Count how many words the input has.",
            "What is the word count?",
        ),
        ("Tell me the number of words in the input.", "What is the count of the words?"),
    ),
    "occurrences": (
        (
            "Count how often the word appears in the text.",
            "How many times does the word occur?",
            "Give the number of occurrences of the word.",
            "Count the word in the text.",
            "How often is the word used?",
        ),
        ("Find how many times the given word is in the text.", "Count each time the word occurs."),
    ),
    "arithmetic": (
        (
            "Compute the result.",
            "Calculate.",
            "What is the answer?",
            "Solve the sum.",
            "Work out the value.",
        ),
        ("Calculate the value.", "What is the result of the sum?"),
    ),
    "extract": (
        (
            "Extract the requested field from the record.",
            "What is the value of the field?",
            "Read the field from the record.",
            "Give the value of the named field.",
            "Look up the field in the record.",
        ),
        ("Return the value of the requested field.", "Which value has the field in the record?"),
    ),
    "uppercase": (
        (
            "Write the input in capital letters.",
            "Uppercase the words.",
            "Convert the text to upper case.",
            "Make every letter a capital.",
            "Shout the words.",
        ),
        ("Change all letters to uppercase.", "Rewrite the input in capital letters."),
    ),
    "copy": (
        (
            "Repeat the input exactly.",
            "Copy the text.",
            "Say the input again.",
            "Echo the words.",
            "Write the input unchanged.",
        ),
        ("Copy the input exactly.", "Repeat the text unchanged."),
    ),
    "first_word": (
        (
            "What is the first word?",
            "Give the first word.",
            "Return the first word.",
            "Which word comes first?",
            "Name the first word.",
        ),
        ("Tell me the first word.", "Output only the first word of the input."),
    ),
    "last_word": (
        (
            "What is the last word?",
            "Give the last word.",
            "Return the last word.",
            "Which word comes last?",
            "Name the final word.",
        ),
        ("Tell me the last word.", "Output only the final word of the input."),
    ),
    "max": (
        (
            "What is the largest number?",
            "Find the maximum.",
            "Give the biggest number.",
            "Which number is the highest?",
            "Return the maximum of the numbers.",
        ),
        ("Pick the largest of the numbers.", "Name the highest number in the list."),
    ),
    "dedupe": (
        (
            "Remove repeated words.",
            "Delete the duplicate words.",
            "Keep each word only once.",
            "Drop words that were already said.",
            "Remove duplicates from the words.",
        ),
        ("Write each word only once.", "Strip out the duplicates."),
    ),
    "plural": (
        (
            "Make each noun plural.",
            "Give the plural forms.",
            "Pluralize the words.",
            "Write the plural of each word.",
            "Turn the nouns into plurals.",
        ),
        ("Change every word to its plural.", "What are the plural forms?"),
    ),
    "longest": (
        (
            "What is the longest word?",
            "Find the longest word.",
            "Give the longest word.",
            "Which word has the most letters?",
            "Return the longest word.",
        ),
        ("Name the word with the most letters.", "Pick out the longest of the words."),
    ),
}
TASKS = tuple(TEMPLATES)
FIELDS = ("name", "city", "age", "color", "job", "pet")

# Chat follow-ups that act on the assistant's previous answer: (task, (train, test phrasings)).
FOLLOW_UPS = {
    "reverse": (("Now reverse that.", "Reverse your answer."), ("Reverse it now.",)),
    "sort": (("Now sort that alphabetically.", "Sort your answer."), ("Alphabetize that.",)),
    "uppercase": (("Now in capital letters.", "Uppercase that."), ("Put it in capital letters.",)),
    "count": (("How many words is that?", "Count those words."), ("Count your answer.",)),
    "first_word": (("What is its first word?",), ("Which is its first word?",)),
}
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a precise assistant. Answer with the result only.",
    "Answer briefly and exactly.",
)


class Instructions:
    """Task functions, input generators, instruction records and chat dialogues."""

    def __init__(self, grammar: Grammar, seed: int = 0):
        self.grammar, self.seed = grammar, seed
        lex = grammar.lex
        self.words = [w for w in lex.nouns + lex.adjectives + lex.verbs if len(w) <= 8][:600]
        self.nouns = [w for w in lex.nouns if len(w) <= 8][:300]
        # The second language ("Veltic"): a word-level lexicon over a small vocabulary.
        rng = make_rng(seed, "veltic")
        inventory = dict(
            onsets=("q", "x", "j", "y", "w", "h", "qu", "zh", "kh"),
            nuclei=("aa", "ii", "uu", "e", "o"),
            codas=("", "", "q", "x", "h"),
        )
        vocab = lex.translation_vocab()
        self.pos: dict[str, str] = {"the": "det", "a": "det"}
        for p, ws in vocab.items():
            for w in ws:
                self.pos[third_person(w) if p == "verb" else w] = p
        self.veltic = {}
        for src in self.pos:
            self.veltic[src] = lex.new_word(lambda: make_word(rng, rng.choice((1, 2)), **inventory))
        self._vocab = vocab

    # -- task functions ------------------------------------------------------------------------

    def apply(self, task: str, text: str) -> str:
        """The exact answer of `task` on input `text` (the ground truth of every record)."""
        w = text.split()
        if task == "translate":
            return self._translate(w)
        if task == "reverse":
            return " ".join(reversed(w))
        if task == "sort":
            return " ".join(sorted(w))
        if task == "count":
            return str(len(w))
        if task == "occurrences":
            word_line, text_line = text.split("\n")
            return str(text_line.split(": ", 1)[1].split().count(word_line.split(": ", 1)[1]))
        if task == "arithmetic":
            a, op, b = w
            return str(int(a) + int(b) if op == "+" else int(a) - int(b))
        if task == "extract":
            record, field = text.split("\n")
            fields = dict(kv.split(": ", 1) for kv in record.split("; "))
            return fields[field.split(": ", 1)[1]]
        if task == "uppercase":
            return text.upper()
        if task == "copy":
            return text
        if task == "first_word":
            return w[0]
        if task == "last_word":
            return w[-1]
        if task == "max":
            return str(max(int(x) for x in w))
        if task == "dedupe":
            return " ".join(dict.fromkeys(w))
        if task == "plural":
            return " ".join(plural(x) for x in w)
        if task == "longest":
            return max(w, key=len)
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")

    def _translate(self, words: list[str]) -> str:
        out, adjs, verbs = [], [], []
        for w in words:
            p, t = self.pos[w], self.veltic[w]
            if p == "adj":
                adjs.append(t)  # held until its noun: adjectives follow nouns in Veltic
            elif p == "verb":
                verbs.append(t)  # Veltic is verb-final
            elif p == "noun":
                out += [t, *adjs]
                adjs = []
            else:
                out.append(t)
        return " ".join(out + adjs + verbs)

    # -- inputs --------------------------------------------------------------------------------

    def make_input(self, task: str, rng: random.Random) -> str:
        """A random input for `task`."""
        if task == "translate":
            v = self._vocab

            def np_():
                adj = [rng.choice(v["adj"])] if rng.random() < 0.5 else []
                return [rng.choice(("the", "a")), *adj, rng.choice(v["noun"])]

            return " ".join(np_() + [third_person(rng.choice(v["verb"]))] + np_())
        if task == "occurrences":
            target = rng.choice(self.words)
            pool = [target] + rng.sample(self.words, 3)
            text = [rng.choice(pool) for _ in range(rng.randint(3, 9))]
            return f"word: {target}\ntext: {' '.join(text)}"
        if task == "arithmetic":
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            return f"{a} + {b}" if rng.random() < 0.5 else f"{max(a, b)} - {min(a, b)}"
        if task == "extract":
            lex = self.grammar.lex
            values = dict(
                name=rng.choice(lex.names),
                city=rng.choice(lex.places),
                age=str(rng.randint(18, 90)),
                color=rng.choice(lex.adjectives[:80]),
                job=rng.choice(self.nouns),
                pet=rng.choice(self.nouns),
            )
            keys = rng.sample(FIELDS, rng.randint(2, 4))
            record = "; ".join(f"{k}: {values[k]}" for k in keys)
            return f"{record}\nfield: {rng.choice(keys)}"
        if task == "max":
            return " ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 6)))
        if task == "dedupe":
            pool = rng.sample(self.words, rng.randint(2, 5))
            return " ".join(rng.choice(pool) for _ in range(rng.randint(3, 8)))
        if task == "plural":
            return " ".join(rng.sample(self.nouns, rng.randint(1, 4)))
        n = rng.randint(1, 3) if task == "copy" else rng.randint(2, 7)
        return " ".join(rng.sample(self.words, n))

    # -- records -------------------------------------------------------------------------------

    def record(self, task: str, split: str, rng: random.Random) -> dict:
        """One `{instruction, input, output, task}` record of `split`."""
        while True:
            text = self.make_input(task, rng)
            if split_of(task + "|" + text) == split:
                break
        instruction = rng.choice(TEMPLATES[task][split == "test"])
        return dict(instruction=instruction, input=text, output=self.apply(task, text), task=task)

    def data(self, split: str, n: int, tasks=None) -> list[dict]:
        """`n` instruction records of `split`, tasks drawn uniformly from `tasks` (default all)."""
        check_split(split)
        tasks = tuple(tasks or TASKS)
        for t in tasks:
            if t not in TEMPLATES:
                raise ValueError(f"unknown task {t!r}; expected one of {TASKS}")
        rng = make_rng(self.seed, "instructions", split, *tasks)
        return [self.record(rng.choice(tasks), split, rng) for _ in range(n)]

    def chat(self, split: str, n: int) -> list[dict]:
        """`n` dialogues `{'messages': [{'role', 'content'}, ...]}`: optional system message, then
        1-3 user/assistant turns; a later turn may be a follow-up on the previous answer
        ("Now reverse that.")."""
        check_split(split)
        rng = make_rng(self.seed, "chat", split)
        out = []
        for _ in range(n):
            msgs = []
            if rng.random() < 0.5:
                msgs.append(dict(role="system", content=rng.choice(SYSTEM_PROMPTS)))
            answer = None
            for _turn in range(rng.randint(1, 3)):
                if answer is not None and len(answer.split()) >= 2 and rng.random() < 0.4:
                    task = rng.choice(tuple(FOLLOW_UPS))
                    user = rng.choice(FOLLOW_UPS[task][split == "test"])
                    answer = self.apply(task, answer)
                else:
                    rec = self.record(rng.choice(TASKS), split, rng)
                    # "Input: " keeps the first input word after a space (see fft.data.formats).
                    user, answer = f"{rec['instruction']}\nInput: {rec['input']}", rec["output"]
                msgs += [dict(role="user", content=user), dict(role="assistant", content=answer)]
            out.append(dict(messages=msgs))
        return out
