"""Run directories and data paths that may be local or remote (`gs://bucket/run`).

`os.path.abspath('gs://bucket/run')` is `<cwd>/gs:/bucket/run`: a local path that silently
takes the run elsewhere. These helpers go through `etils.epath`, which keeps a URL as it is
(orbax and grain take `epath.Path`s and reach the bucket through their own I/O) and makes a
local path absolute, so every process of a run names the same directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """True for `scheme://...` paths (gs://, s3://, ...), which must never be made absolute."""
    return "://" in os.fspath(path)


def workdir_path(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path`: a URL unchanged, a local path absolute (`~` expanded).

    Args:
      path: a str, os.PathLike or epath.Path naming a directory or file.

    Returns:
      An `epath.Path`; `str()` of it is the URL itself (e.g. 'gs://b/r') or the absolute path.
    """
    if isinstance(path, epath.Path) and is_url(path):
        return path
    text = os.fspath(path)
    if is_url(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def workdir_str(path: PathLike) -> str:
    """`str(workdir_path(path))`, for code that joins paths with `os.path.join`."""
    return str(workdir_path(path))


def read_json(path: PathLike, default: Any = None) -> Any:
    """The JSON value stored at `path`, or `default` when there is no such file."""
    p = workdir_path(path)
    if not p.exists():
        return default
    return json.loads(p.read_text())


def write_json(path: PathLike, value: Any, *, indent: int | None = 2) -> None:
    """Writes `value` as JSON to `path` (parents created); `default=str` for odd leaves.

    A local file is written to a temporary name and renamed, so a reader never sees half of
    it; a remote object is written whole by the store.
    """
    p = workdir_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, indent=indent, default=str)
    if is_url(p):
        p.write_text(text)
        return
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(p)
