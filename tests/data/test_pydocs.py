"""fft.data.pydocs: CPython stdlib docstrings, split by top-level module (held-out text)."""

import pytest

from fft.config_lib import FFTError
from fft.data import pydocs


@pytest.fixture(scope="module")
def splits():
    return {s: pydocs.records(s) for s in pydocs.SPLITS}


def test_splits_are_disjoint_by_module_and_by_text(splits):
    train_mods = {m for m, _ in splits["train"]}
    eval_mods = {m for m, _ in splits["eval"]}
    assert not train_mods & eval_mods
    assert not {t for _, t in splits["train"]} & {t for _, t in splits["eval"]}
    # Every module's side is its crc32 bucket; no text of an eval module is replayed.
    assert all(pydocs.split_of(m) == "eval" for m in eval_mods)
    assert all(pydocs.split_of(m) == "train" for m in train_mods)


def test_split_is_by_top_level_module():
    # Submodules take their package's side: email.parser and email.mime.text are both 'email'.
    files = pydocs._module_files(pydocs.stdlib_dir())
    tops = {top for top, path in files if "/email/" in path}
    assert tops == {"email"}
    assert not any("/test/" in path or "site-packages" in path for _, path in files)


def test_deterministic(splits):
    pydocs._splits.cache_clear()  # re-read the files, not the cached result
    again = {s: pydocs.records(s) for s in pydocs.SPLITS}
    assert again == splits
    assert pydocs.texts("eval", limit=50) == [t for _, t in splits["eval"][:50]]
    # The first `limit` of the fixed order spread over many modules, not one file's run.
    assert len({m for m, _ in splits["eval"][:100]}) >= 10


def test_non_trivial_size_and_english(splits):
    assert len(splits["train"]) >= 1000 and len(splits["eval"]) >= 200
    eval_words = sum(len(t.split()) for _, t in splits["eval"])
    assert eval_words >= 15_000
    assert all(len(t.split()) >= pydocs.MIN_WORDS for _, t in splits["eval"])
    assert not any(line.lstrip().startswith(">>>") for _, t in splits["eval"] for line in
                   t.splitlines())  # fmt: skip
    words = [w.lower() for _, t in splits["eval"] for w in t.split()]
    assert words.count("the") / len(words) > 0.03  # English prose, not code


def test_docstrings_of_a_file(tmp_path):
    path = tmp_path / "m.py"
    long = " ".join(["word"] * 25)
    path.write_text(
        f'"""{long}\n\n>>> f(1)\n2\n\nafter the example."""\n'
        f'def f(x):\n    """short"""\n\nclass C:\n    """{long} class."""\n'
    )
    docs = pydocs.docstrings(str(path))
    assert docs == [f"{long}\n\nafter the example.", f"{long} class."]


def test_bad_split_is_named():
    with pytest.raises(FFTError, match="pydocs split 'test'"):
        pydocs.records("test")
