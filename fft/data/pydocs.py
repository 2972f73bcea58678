"""Real English text that every Python install ships: the docstrings of CPython's standard library.

Source `pydoc:stdlib-docstrings`: the module, class and function docstrings of the `.py` files in
the running interpreter's standard library directory (`sysconfig.get_paths()['stdlib']`), read
with `ast` (nothing is imported), cleaned by `inspect.cleandoc` (via `ast.get_docstring`), with
doctest blocks (`>>>` lines and their output) removed; docstrings of fewer than `MIN_WORDS` words
are dropped. Tests, demos, `site-packages` and IDLE are left out (they are not library prose).

Train / eval split by TOP-LEVEL MODULE (`email.mime.text` and `email.parser` share `email`): a
module is eval when crc32 of its name falls in the first `EVAL_PERCENT` of 100 buckets, so the
split depends only on the name and is the same on every machine and Python version. A text that
occurs in several modules (copied docstrings) is kept once, in eval if any eval module has it, so
no eval text is ever in the train split (the replay source of domain adaptation).

    >>> from fft.data import pydocs
    >>> train, held_out = pydocs.texts("train"), pydocs.texts("eval")
"""

from __future__ import annotations

import ast
import functools
import os
import platform
import random
import re
import sysconfig
import zlib

from fft.config_lib import FFTError

SOURCE = "pydoc:stdlib-docstrings"
SPLITS = ("train", "eval")
EVAL_PERCENT = 15  # share of top-level modules (by crc32 bucket) held out for evaluation
MIN_WORDS = 20  # shorter docstrings ("Return self==value.") are boilerplate, not prose
# Parts of the stdlib tree that are not library prose (or not the library at all).
_SKIP_PARTS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "turtledemo",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "__phello__",
}


def stdlib_dir() -> str:
    """The running interpreter's standard library directory (where the text comes from)."""
    return sysconfig.get_paths()["stdlib"]


def source_name(split: str = "eval") -> str:
    """The text's name for results.json, precise enough to rebuild it on another machine."""
    return (
        f"{SOURCE}:{split} (CPython {platform.python_version()} standard library docstrings, "
        f"split by top-level module, {EVAL_PERCENT}% of modules held out for eval)"
    )


def split_of(module: str) -> str:
    """'eval' or 'train' for a top-level module name; depends only on the name."""
    return "eval" if zlib.crc32(module.encode("utf-8")) % 100 < EVAL_PERCENT else "train"


def _module_files(root: str) -> list[tuple[str, str]]:
    """[(top-level module, path)] of every library .py file under `root`, in sorted order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        # Only packages below the top level (a directory of the tree that is not a package,
        # e.g. config-3.11-x86_64-linux-gnu, holds no library modules).
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _SKIP_PARTS
            and not d.startswith(("config-", "lib-dynload"))
            and os.path.isfile(os.path.join(dirpath, d, "__init__.py"))
        )
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            top = parts[0] if parts else name[: -len(".py")]
            out.append((top, os.path.join(dirpath, name)))
    return sorted(out, key=lambda tp: (tp[0], tp[1]))


def _strip_doctests(text: str) -> str:
    """`text` without doctest blocks: a `>>>` line and the lines after it up to a blank one."""
    kept, in_block = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_block = True
        elif not stripped:
            in_block = False
        if not in_block:
            kept.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()  # one blank line where a block was


def docstrings(path: str, min_words: int = MIN_WORDS) -> list[str]:
    """The cleaned docstrings of one source file (module, classes, functions), in file order."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return []  # a file the running parser cannot read (e.g. lib2to3 test data)
    out = []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, nodes):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                doc = _strip_doctests(doc)
                if len(doc.split()) >= min_words:
                    out.append(doc)
    return out


@functools.lru_cache(maxsize=4)
def _splits(root: str, min_words: int) -> dict[str, tuple[tuple[str, str], ...]]:
    """{split: ((module, text), ...)} for the stdlib at `root`, each text once."""
    by_text: dict[str, list[str]] = {}
    for module, path in _module_files(root):
        for doc in docstrings(path, min_words):
            by_text.setdefault(doc, []).append(module)
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for doc, modules in by_text.items():
        # A text that any eval module has is eval text: never replayed in training.
        split = "eval" if any(split_of(m) == "eval" for m in modules) else "train"
        out[split].append((next(m for m in modules if split_of(m) == split), doc))
    return {s: tuple(v) for s, v in out.items()}


def records(split: str, *, limit: int | None = None, min_words: int = MIN_WORDS,
            root: str | None = None) -> list[tuple[str, str]]:  # fmt: skip
    """[(top-level module, text)] of `split`, in a fixed shuffled order (so `limit` spans modules).

    Args:
      split: 'train' or 'eval'.
      limit: at most this many (the first of the fixed order); None = all.
      min_words: docstrings with fewer whitespace words are dropped.
      root: the standard library directory (default: the running interpreter's).
    """
    if split not in SPLITS:
        raise FFTError(f"pydocs split {split!r}: choose one of {SPLITS}.")
    root = root or stdlib_dir()
    if not os.path.isdir(root):
        raise FFTError(f"pydocs: the standard library directory {root} does not exist.")
    out = list(_splits(root, min_words)[split])
    random.Random(f"{SOURCE}:{split}").shuffle(out)  # fixed order; str seeds are stable
    if not out:
        raise FFTError(f"pydocs: no {split} docstrings of >= {min_words} words under {root}.")
    return out[:limit] if limit is not None else out


def texts(split: str, *, limit: int | None = None, min_words: int = MIN_WORDS,
          root: str | None = None) -> list[str]:  # fmt: skip
    """The texts of `records(split, ...)` (one docstring each)."""
    return [t for _, t in records(split, limit=limit, min_words=min_words, root=root)]
