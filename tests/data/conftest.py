"""Shared fixtures for the data tests: a small sentencepiece tokenizer and JSONL writers."""

import json
import random

import pytest

from fft.tokenizers import train_sentencepiece

WORDS = (
    "the cat sat on a mat and the dog ran home quickly while birds sang songs of "
    "red blue green numbers add one two three instruction response answer question"
).split()


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return train_sentencepiece(
        corpus(),
        320,
        str(tmp_path_factory.mktemp("tok")),
        user_defined_symbols=["<|user|>", "<|assistant|>", "<|system|>"],
    )


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture
def jsonl(tmp_path):
    """jsonl(name, records) writes records (dicts, or raw strings for bad lines) under tmp_path."""
    return lambda name, records: write_jsonl(tmp_path / name, records)


@pytest.fixture
def make_corpus():
    """make_corpus(n, seed) -> n deterministic sentences over WORDS."""
    return corpus
