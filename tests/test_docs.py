"""The README and docs/ stay usable: links resolve, the README stays a short guide, its test
command is the one CI runs, and its example records are records fft reads."""

import json
import pathlib
import re
import shlex

import pytest

from fft.data import formats
from fft.tokenizers import train_sentencepiece

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 260

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The markdown without code blocks or inline code (their brackets are not links)."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = _INLINE_CODE.sub(lambda m: m.group()[1:-1], heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def _links(page: pathlib.Path):
    for m in _LINK.finditer(_prose(page.read_text())):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        yield target


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not bad, f"{page.name} links to: " + ", ".join(bad)


def test_the_link_checker_sees_links():
    """The checker reads real links, ignores code, and finds the anchors GitHub makes."""
    links = list(_links(README))
    assert "docs/results.md" in links and "colab/rlhf.ipynb" in links
    assert not any(t.startswith("http") for t in links)
    assert _slug("RLHF: reward model, PPO / GRPO, DPO / IPO") == (
        "rlhf-reward-model-ppo--grpo-dpo--ipo"
    )
    assert _slug("Where the code departs from DESIGN.md") == "where-the-code-departs-from-designmd"
    assert "[x](nowhere.md)" not in _prose("`[x](nowhere.md)`\n```\n[y](z.md)\n```\n")


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES})"


def _ci_commands() -> list[str]:
    """The install and test commands `.ci/run` executes, in order, inside its venv."""
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip().startswith("python -m ")]


def test_readme_test_command_is_what_ci_runs():
    ci = _ci_commands()
    assert ci[-1].startswith("python -m pytest tests") and any("torch==" in c for c in ci)
    block = re.search(r"```bash\n(python -m pip install[^\n]*)\n```", README.read_text())
    assert block, "README.md lost its test command (a ```bash block of `python -m pip install`)"
    assert block.group(1).split(" && ") == ci
    for command in ci:
        shlex.split(command)  # each is a well-formed shell command


def _format_of(record: dict) -> str:
    if "messages" in record or "conversations" in record:
        return "chat"
    for key, fmt in (
        ("chosen", "preference"),
        ("responses", "ranking"),
        ("instruction", "instruction"),
        ("completion", "prompt_completion"),
        ("label", "classification"),
        ("labels", "classification"),
    ):
        if key in record:
            return fmt
    return "text"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    lines = [ln for ln in README.read_text().splitlines() if ln.strip()]
    return train_sentencepiece(lines, 400, str(tmp_path_factory.mktemp("tok")))


def test_readme_example_records_are_read(tokenizer):
    """One example record per data format, each encoded by fft.data.formats as the README says."""
    block = re.search(r"```jsonl\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md lost its ```jsonl block of example records"
    records = [json.loads(line) for line in block.group(1).splitlines() if line.strip()]
    by_format = {_format_of(r): r for r in records}
    assert sorted(by_format) == sorted(formats.FORMATS) and len(records) == len(formats.FORMATS)
    for fmt, record in by_format.items():
        labels = [record["label"], "negative"] if fmt == "classification" else None
        out = formats.encode_record(record, fmt, tokenizer, max_len=256, label_names=labels)
        if fmt == "preference":
            assert any(out["chosen_loss_mask"]) and any(out["rejected_loss_mask"])
        elif fmt == "ranking":
            assert out["ranks"] == record["ranking"] and len(out["cand_tokens"]) == 3
        elif fmt == "classification":
            assert out["label"] == 0
        else:
            target = [t for t, m in zip(out["tokens"], out["loss_mask"], strict=True) if m]
            answer = {
                "text": record.get("text", ""),
                "instruction": record.get("output"),
                "prompt_completion": record.get("completion", "").strip(),
                "chat": record["messages"][-1]["content"] if fmt == "chat" else None,
            }[fmt]
            assert answer[-4:] in tokenizer.decode(target), (fmt, tokenizer.decode(target))
