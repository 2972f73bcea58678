"""Record sources: JSONL, ArrayRecord, TFDS `data_source`, and growing shard directories.

Random-access sources (`JsonlSource`, `ArrayRecordSource`, `tfds_source`) have `len()` and
`source[i] -> dict` so grain can shuffle and shard them; `source.origin(i)` names the record
("file:line") for error messages. A bad record either raises `BadRecordError` naming file and
1-based line, or (on_bad_record='skip') reads as None and is counted in `source.skipped`.

`ShardStream` reads a directory of JSONL shards that grows while training runs: shards in sorted
name order, new ones picked up as they appear; its position (shard, record) is its state.
Writers should create shards atomically (write `name.tmp`, then rename to `name.jsonl`).
"""

from __future__ import annotations

import bisect
import glob as glob_lib
import json
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np
from etils import epath

from fft import paths
from fft.config_lib import FFTError

ON_BAD_RECORD = ("error", "skip")


class BadRecordError(FFTError):
    """A record that cannot be read or lacks a field; the message names file and line."""


def _one_line(error: Exception, limit: int) -> str:
    """An exception's text on one line, cut to `limit` characters (for one-line errors)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:limit]


def _check_policy(on_bad_record: str) -> None:
    if on_bad_record not in ON_BAD_RECORD:
        raise FFTError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")


def _parse_json_line(line: bytes | str, where: str) -> dict:
    """Parses one JSON object; raises BadRecordError naming `where` (file:line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecordError(f"{where}: bad JSON record ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise BadRecordError(f"{where}: record is not UTF-8 text ({e.reason})") from None
    except (ValueError, RecursionError) as e:
        # ValueError: an integer literal longer than Python's digit limit; RecursionError:
        # arrays nested thousands deep. Both are bad records, not crashes.
        raise BadRecordError(f"{where}: bad JSON record ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict):
        raise BadRecordError(f"{where}: record is a {type(record).__name__}, expected an object")
    return record


def _open_binary(path: str):
    """A binary file handle; a URL (`gs://...`) is opened through etils.epath."""
    if paths.is_url(path):
        return epath.Path(path).open("rb")
    return open(path, "rb")  # noqa: SIM115 - the caller closes it (or keeps it open)


def _url_files_for(spec: str) -> list[str]:
    """`_files_for` for a URL: a directory, a glob in the last component, or one object."""
    path = epath.Path(spec)
    if any(c in path.name for c in "*?["):
        files = sorted(str(p) for p in path.parent.glob(path.name))
    elif path.is_dir():
        files = sorted(
            str(p)
            for p in path.iterdir()
            if p.name.endswith((".jsonl", ".json", ".array_record")) or ".array_record-" in p.name
        )
    elif path.exists():
        files = [spec]
    else:
        raise FFTError(f"data file not found: {spec}")
    if not files:
        raise FFTError(f"no data files match {spec!r}")
    return files


def _read_bytes(path: str) -> bytes:
    """The bytes of a data file; an unreadable one (a directory, no permission) is an FFTError."""
    try:
        with _open_binary(path) as f:
            return f.read()
    except OSError as e:
        raise FFTError(f"cannot read data file {path}: {e.strerror or e}") from None


def _line_offsets(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers of the non-blank lines of a file (vectorised)."""
    data = np.frombuffer(_read_bytes(path), np.uint8)
    ends = np.flatnonzero(data == ord("\n"))
    if data.size and data[-1] != ord("\n"):
        ends = np.append(ends, data.size)
    if not ends.size:
        return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    # A line is blank when it holds only whitespace: count non-whitespace bytes per line.
    solid = np.concatenate([[0], np.cumsum(~np.isin(data, (9, 10, 13, 32)), dtype=np.int64)])
    keep = solid[ends] - solid[starts] > 0
    lines = np.flatnonzero(keep).astype(np.int64) + 1
    return starts[keep], lines


class JsonlSource:
    """Random access over the records of one or more JSONL files (one JSON object per line).

    An index of line offsets is built once (numpy, fast), so grain can shuffle without reading
    whole files into memory. Blank lines are ignored.

    Args:
      paths: a file path or a sequence of paths (records are numbered across files in order).
      on_bad_record: 'error' raises BadRecordError naming file:line; 'skip' returns None for
        that record and counts it in `self.skipped`.
    """

    def __init__(self, paths: str | Sequence[str], on_bad_record: str = "error"):
        _check_policy(on_bad_record)
        self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not self.paths:
            raise FFTError("JsonlSource: no files given")
        self.on_bad_record = on_bad_record
        self.skipped = 0
        self._offsets, self._lines, cum = [], [], [0]
        for path in self.paths:
            if not epath.Path(path).exists():
                raise FFTError(f"data file not found: {path}")
            offsets, lines = _line_offsets(path)
            self._offsets.append(offsets)
            self._lines.append(lines)
            cum.append(cum[-1] + len(offsets))
        self._cum = cum
        self._files = {}
        if not len(self):
            # An empty source would make training stop at step 0 (or an epoch loop spin).
            raise FFTError(f"data file {_names(self.paths)} holds no records (empty or blank)")

    def __len__(self) -> int:
        return self._cum[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        f = bisect.bisect_right(self._cum, index) - 1
        return f, index - self._cum[f]

    def origin(self, index: int) -> str:
        """'file:line' of record `index` (1-based line)."""
        f, i = self._locate(index)
        return f"{self.paths[f]}:{int(self._lines[f][i])}"

    def __getitem__(self, index: int) -> dict | None:
        f, i = self._locate(int(index))
        handle = self._files.get(f)
        if handle is None:
            handle = self._files[f] = _open_binary(self.paths[f])  # kept open
        handle.seek(int(self._offsets[f][i]))
        line = handle.readline()
        try:
            return _parse_json_line(line, f"{self.paths[f]}:{int(self._lines[f][i])}")
        except BadRecordError:
            if self.on_bad_record == "error":
                raise
            self.skipped += 1
            return None

    def __getstate__(self):  # open file handles do not pickle (grain worker processes)
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __repr__(self) -> str:
        return f"JsonlSource({len(self.paths)} files, {len(self)} records)"


class ArrayRecordSource:
    """Random access over ArrayRecord files whose records are JSON-encoded objects (bytes).

    Each file is opened on its own, so a truncated or corrupt file is named in the error, and
    `origin(i)` names the file and the record's index in it (`path#record7`).
    """

    def __init__(self, paths: str | Sequence[str], on_bad_record: str = "error"):
        import grain

        _check_policy(on_bad_record)
        self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not self.paths:
            raise FFTError("ArrayRecordSource: no files given")
        self.on_bad_record = on_bad_record
        self.skipped = 0
        self._sources, cum = [], [0]
        for path in self.paths:
            if not epath.Path(path).exists():
                raise FFTError(f"data file not found: {path}")
            try:
                source = grain.sources.ArrayRecordDataSource([os.fspath(path)])
            except Exception as e:  # noqa: BLE001 - riegeli reports truncation as RuntimeError
                raise FFTError(
                    f"cannot read ArrayRecord file {path} (truncated or corrupt?): "
                    + _one_line(e, 200)
                ) from None
            self._sources.append(source)
            cum.append(cum[-1] + len(source))
        self._cum = cum
        if not len(self):
            raise FFTError(f"data file {_names(self.paths)} holds no records")

    def __len__(self) -> int:
        return self._cum[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        f = bisect.bisect_right(self._cum, index) - 1
        return f, index - self._cum[f]

    def origin(self, index: int) -> str:
        """'file#recordN' of record `index` (N counts from 0 within that file)."""
        f, i = self._locate(int(index))
        return f"{self.paths[f]}#record{i}"

    def __getitem__(self, index: int) -> dict | None:
        f, i = self._locate(int(index))
        try:
            try:
                raw = self._sources[f][i]
            except Exception as e:  # noqa: BLE001 - a corrupt chunk is a RuntimeError
                raise BadRecordError(
                    f"{self.origin(index)}: unreadable ({_one_line(e, 200)})"
                ) from None
            return _parse_json_line(raw, self.origin(index))
        except BadRecordError:
            if self.on_bad_record == "error":
                raise
            self.skipped += 1
            return None

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records)"


def _names(paths: Sequence[str]) -> str:
    """One path, or 'a, b, ...' for several (error messages)."""
    return os.fspath(paths[0]) if len(paths) == 1 else ", ".join(map(os.fspath, paths))


def _to_python(x):
    """TFDS features come back as numpy bytes/arrays; formats want str, int, list."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, dict):
        return {k: _to_python(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return [_to_python(v) for v in x] if x.dtype == object else x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


class TfdsSource:
    """A TFDS dataset prepared as ArrayRecord, read with `tfds.data_source` (no TensorFlow)."""

    def __init__(
        self, name: str, split: str, data_dir: str | None = None, on_bad_record: str = "error"
    ):
        import tensorflow_datasets as tfds

        _check_policy(on_bad_record)
        self.name, self.split, self.on_bad_record = name, split, on_bad_record
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # tfds raises many types; the user needs one message
            raise FFTError(
                f"cannot open TFDS dataset {name!r} split {split!r} (data_dir={data_dir}): {e}. "
                "Prepare it as ArrayRecord first (tfds build --file_format=array_record)."
            ) from None
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._source)

    def origin(self, index: int) -> str:
        return f"tfds:{self.name}/{self.split}#{index}"

    def __getitem__(self, index: int) -> dict | None:
        try:
            try:
                return _to_python(self._source[int(index)])
            except UnicodeDecodeError as e:
                raise BadRecordError(
                    f"{self.origin(index)}: text is not UTF-8 ({e.reason})"
                ) from None
            except Exception as e:  # noqa: BLE001 - a corrupt ArrayRecord chunk
                raise BadRecordError(
                    f"{self.origin(index)}: unreadable ({_one_line(e, 200)})"
                ) from None
        except BadRecordError:
            if self.on_bad_record == "error":
                raise
            self.skipped += 1
            return None


def tfds_source(
    name: str, split: str, data_dir: str | None = None, on_bad_record: str = "error"
) -> TfdsSource:
    """A random-access source over a prepared TFDS dataset (see TfdsSource)."""
    return TfdsSource(name, split, data_dir, on_bad_record)


def _files_for(spec: str) -> list[str]:
    if paths.is_url(spec):
        return _url_files_for(spec)
    if os.path.isdir(spec):
        files = sorted(
            os.path.join(spec, n)
            for n in os.listdir(spec)
            if n.endswith((".jsonl", ".json", ".array_record")) or ".array_record-" in n
        )
    elif any(c in spec for c in "*?["):
        files = sorted(glob_lib.glob(spec))
    else:
        if not os.path.exists(spec):
            raise FFTError(f"data file not found: {spec}")
        files = [spec]
    if not files:
        raise FFTError(f"no data files match {spec!r}")
    return files


def open_source(spec: str, *, on_bad_record: str = "error", data_dir: str | None = None):
    """Opens a random-access source from a string.

    Args:
      spec: a JSONL or ArrayRecord file, a glob, a directory (its *.jsonl / *.array_record
        files, sorted), or `tfds:NAME/SPLIT` (e.g. `tfds:imdb_reviews/train`).
      on_bad_record: 'error' or 'skip' (see JsonlSource).
      data_dir: TFDS data_dir for `tfds:` specs.

    Returns:
      A source with len(), [i] and origin(i).
    """
    if not isinstance(spec, str):
        return spec  # already a source
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:") :].partition("/")
        return tfds_source(name, split or "train", data_dir, on_bad_record)
    files = _files_for(spec)
    is_ar = [(".array_record" in os.path.basename(f)) for f in files]
    if all(is_ar):
        return ArrayRecordSource(files, on_bad_record)
    if any(is_ar):
        raise FFTError(f"{spec!r} mixes JSONL and ArrayRecord files; give them separately")
    return JsonlSource(files, on_bad_record)


def read_records(spec, *, on_bad_record: str = "error", limit: int | None = None) -> list[dict]:
    """Every readable record of `spec` (see `open_source`; or an opened source), in order.

    In 'skip' mode the unreadable ones are left out and their number is printed, naming the
    data; `limit` stops after that many readable records.
    """
    src = open_source(spec, on_bad_record=on_bad_record)
    out = []
    for i in range(len(src)):
        if limit is not None and len(out) >= limit:
            break
        record = src[i]
        if record is not None:
            out.append(record)
    if getattr(src, "skipped", 0):
        name = spec if isinstance(spec, str) else type(src).__name__
        print(f"[data] {name}: skipped {src.skipped} bad records (data.on_bad_record=skip).")
    return out


def _is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates ("\\ud800" in JSON), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def field_values(source, name: str = "text", *, limit: int | None = None) -> list[str]:
    """The string field `name` of the first `limit` records of a random-access source.

    For callers that read a field themselves (e.g. tokenizer training) rather than through
    `formats.encode_record`: a record without the field, or with a non-string value, is a
    BadRecordError naming its origin, or (the source in 'skip' mode) skipped and counted in
    `source.skipped`, like a record that is not JSON.

    Args:
      source: a source from `open_source` (len, [i], origin(i), on_bad_record, skipped).
      name: the field to read.
      limit: read at most this many records (None: all).

    Returns:
      The values, in record order, bad records left out.
    """
    n = len(source) if limit is None else min(len(source), limit)
    skip = getattr(source, "on_bad_record", "error") == "skip"
    out = []
    for i in range(n):
        record = source[i]
        if record is None:  # already counted by the source
            continue
        value = record.get(name)
        if isinstance(value, str) and _is_unicode(value):
            out.append(value)
            continue
        if not skip:
            got = "missing" if value is None else type(value).__name__
            got = "not valid Unicode (a lone surrogate)" if isinstance(value, str) else got
            origin = source.origin(i) if hasattr(source, "origin") else f"record {i}"
            raise BadRecordError(f"{origin}: field {name!r} is {got}, expected a string")
        source.skipped = getattr(source, "skipped", 0) + 1
    return out


# ------------------------------------------------------------------------------------------------
# Growing shard directories (continual pre-training)
# ------------------------------------------------------------------------------------------------


class ShardStream:
    """Reads JSONL shards of a directory in sorted name order, picking up shards added later.

    The position — the shard name, the index of the next record in it, and its byte offset — is
    the checkpointable state (`get_state()` / `set_state()`); it survives restarts. Shards whose
    names sort before the current one are treated as consumed, so name new shards so they sort
    last (e.g. zero-padded numbers or timestamps).

    Args:
      directory: the shard directory (may be empty at first when stop_at_end=False).
      pattern: glob of shard names inside the directory.
      poll_interval_s: how often to look for new shards / new lines at the end.
      stop_at_end: True: iteration ends when every shard present is consumed. False: wait for new
        shards (up to `timeout_s`, None = forever).
      on_bad_record: 'error' or 'skip' (counted in `self.skipped`).
      timeout_s: with stop_at_end=False, stop after waiting this long with no new data.
    """

    def __init__(
        self,
        directory: str,
        pattern: str = "*.jsonl",
        poll_interval_s: float = 1.0,
        stop_at_end: bool = True,
        on_bad_record: str = "error",
        timeout_s: float | None = None,
    ):
        _check_policy(on_bad_record)
        if not os.path.isdir(directory):
            raise FFTError(f"shard directory not found: {directory}")
        self.directory, self.pattern = directory, pattern
        self.poll_interval_s, self.stop_at_end = poll_interval_s, stop_at_end
        self.on_bad_record, self.timeout_s = on_bad_record, timeout_s
        self.skipped = 0
        self._shard: str | None = None  # name of the shard being read
        self._record = 0  # records (non-blank lines) of it already returned
        self._line = 0  # lines of it already read (for 1-based error line numbers)
        self._byte = 0
        self._handle = None

    # -- state ---------------------------------------------------------------------------------

    def get_state(self) -> dict:
        return {
            "shard": self._shard,
            "record": self._record,
            "line": self._line,
            "byte": self._byte,
        }

    def set_state(self, state: dict) -> None:
        self._close()
        self._shard = state["shard"]
        self._record, self._line, self._byte = state["record"], state["line"], state["byte"]

    def _close(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    # -- reading -------------------------------------------------------------------------------

    def shards(self) -> list[str]:
        return sorted(
            os.path.basename(p) for p in glob_lib.glob(os.path.join(self.directory, self.pattern))
        )

    def _next_shard(self) -> str | None:
        later = [s for s in self.shards() if self._shard is None or s > self._shard]
        return later[0] if later else None

    def _open(self):
        path = os.path.join(self.directory, self._shard)
        self._handle = open(path, "rb")  # noqa: SIM115 (kept open across calls)
        self._handle.seek(self._byte)

    def _read_line(self) -> bytes | None:
        """The next complete line of the current shard, or None at its end."""
        if self._shard is None:
            return None
        if self._handle is None:
            self._open()
        line = self._handle.readline()
        if not line.endswith(b"\n"):
            # End of file, or a partly written last line: re-read it whole later.
            self._handle.seek(self._byte)
            return None
        self._byte += len(line)
        self._line += 1
        return line

    def next_record(self) -> tuple[dict | None, str]:
        """Returns (record or None if skipped as bad, 'file:line'); raises StopIteration at end."""
        waited_since = None
        while True:
            line = self._read_line()
            if line is not None:
                if not line.strip():
                    continue
                where = f"{os.path.join(self.directory, self._shard)}:{self._line}"
                self._record += 1
                try:
                    return _parse_json_line(line, where), where
                except BadRecordError:
                    if self.on_bad_record == "error":
                        raise
                    self.skipped += 1
                    return None, where
            nxt = self._next_shard()
            if nxt is not None:
                self._close()
                self._shard, self._record, self._line, self._byte = nxt, 0, 0, 0
                continue
            if self.stop_at_end:
                raise StopIteration
            waited_since = waited_since or time.monotonic()
            if self.timeout_s is not None and time.monotonic() - waited_since > self.timeout_s:
                raise StopIteration
            time.sleep(self.poll_interval_s)

    def __iter__(self) -> Iterator[dict | None]:
        while True:
            try:
                yield self.next_record()[0]
            except StopIteration:
                return

    def __repr__(self) -> str:
        return f"ShardStream({self.directory!r}, {self.pattern!r}, at {self.get_state()})"
