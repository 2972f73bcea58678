"""A local ranking page that collects human feedback for RLHF.

    python -m fft.label --model=fft:tiny --prompts=prompts.jsonl --k=3 --out=rankings.jsonl
    python -m fft.label --report --out=rankings.jsonl [more.jsonl ...]

The tool samples K answers per prompt with fft's generator and serves one page on which a person
orders them best-first (drag, arrow keys on a focused card, or keys 1..K), may mark ties, skip
or undo, and sees done / total. The answers are shown in a random order per prompt and labeler
(seeded, so a reload or a restart shows the same order; position bias averages out across
prompts) and unranked until the labeler acts. Every judgement is appended to the rankings JSONL
at once (flushed and fsynced) in the format the reward model trains on (fft.data.formats'
`ranking` format, the convention of the synthetic preferences):

    {"prompt": str, "responses": [str, ...], "ranking": [rank of responses[i], 0 = best],
     "order": [response indices best-first], "shown": [response indices in display order],
     "labeler": str, "time": iso8601, "ties": [[i, j], ...]}   # ties only when there are any
    {"prompt": str, "responses": [...], "skipped": true, "shown": [...], "labeler", "time"}
    {"prompt": str, "undo": true, "undone": "ranking" | "skip", "labeler": str, "time": iso8601}

`ranking` is always a strict order (what Plackett-Luce needs); a tie between answers i and j
(neighbours in `order`) is listed in `ties`, for losses that drop or soften tied pairs. Undo
(the page's Undo button or U) takes back this session's last judgement or skip: the file gets an
undo line, nothing is rewritten, and the prompt is asked again. Every reader honours undo lines
through `fft.data.labels` (this tool's restart and --report, the reward model, DPO).

A restart reads the file and asks this labeler only the prompts they have not judged (ranked or
skipped), so a crash or Ctrl-C loses nothing and asks nothing twice. Answers for a prompt are
sampled with a seed derived from the prompt text, so labelers who share a model see the same
answers and `--report` can measure their agreement.

Model text is untrusted: the page shows it with textContent only, and a strict
Content-Security-Policy (per-response nonce, no inline handlers) backs that up. The server binds
127.0.0.1 by default and rejects foreign Host headers (DNS rebinding); binding any other address
requires an access token (given with --token or generated and printed at start) that every
request must carry; a browser without it gets a page that says how to pass it. The server
accepts a judgement only for a prompt it served to this labeler.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import hmac
import http.server
import ipaddress
import itertools
import json
import os
import random
import secrets
import socket
import sys
import threading
import urllib.parse
import zlib
from collections.abc import Callable, Sequence

from fft.config_lib import FFTError
from fft.data import labels

# sample(prompts, k) -> for each prompt, k answers. Injectable so tests need no model.
Sampler = Callable[[list[str], int], list[list[str]]]

_PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "label_page.html")
_MAX_BODY = 1 << 20  # a judgement is a few hundred bytes; refuse anything absurd


# --------------------------------------------------------------------------------------------
# Files: prompts in, rankings out
# --------------------------------------------------------------------------------------------


def load_prompts(path: str) -> list[str]:
    """Reads a prompts JSONL file: one `{"prompt": "..."}` object (or a JSON string) per line.

    Args:
      path: the JSONL file. Blank lines are ignored; a prompt that repeats is asked once.

    Returns:
      The prompts in file order, without duplicates.

    Raises:
      FFTError: the file is missing or empty, or a line is not valid (naming file and line).
    """
    if not os.path.isfile(path):
        raise FFTError(f"--prompts={path!r}: no such file. Give a JSONL file of {{'prompt': ...}}.")
    prompts: dict[str, None] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise FFTError(
                    f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}). Each line must be "
                    'an object such as {"prompt": "..."}.'
                ) from None
            if isinstance(value, dict):
                value = value.get("prompt")
            if not isinstance(value, str) or not value.strip():
                raise FFTError(
                    f'{path}:{n}: expected an object with a non-empty string "prompt" field, '
                    f"got {line.strip()[:80]!r}."
                )
            prompts[value] = None
    if not prompts:
        raise FFTError(f"--prompts={path!r}: the file holds no prompts.")
    return list(prompts)


def read_rankings(path: str) -> list[dict]:
    """Reads a rankings JSONL file; a missing file is empty.

    A torn last line (a write cut short by a crash, never acknowledged to the labeler) is
    ignored; a bad line anywhere else is an error, because labels are too costly to drop silently.
    """
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # the last line has no newline: a torn write
                print(f"fft.label: ignoring a torn last line in {path}:{n}", file=sys.stderr)
                continue
            raise FFTError(f"{path}:{n}: not valid JSON; fix or remove the line.") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise FFTError(f'{path}:{n}: expected a ranking object with a "prompt" field.')
        records.append(record)
    return records


class RankingLog:
    """The append-only rankings file of one labeler session."""

    def __init__(self, path: str, labeler: str):
        self.path = path
        self.labeler = labeler
        records = labels.live_judgements(read_rankings(path))
        self.done = {r["prompt"] for r in records if r.get("labeler") == labeler}
        self._repair_tail()

    def _repair_tail(self) -> None:
        """Makes the next append start on a line of its own (drops a torn, unparsable tail)."""
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            start = data.rfind(b"\n") + 1
            try:
                json.loads(data[start:])
                f.write(b"\n")
            except ValueError:
                f.truncate(start)

    def append(self, record: dict) -> None:
        """Appends one judgement and forces it to disk before returning."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# Session: which prompt is next, validating and recording judgements
# --------------------------------------------------------------------------------------------


class NotServedError(Exception):
    """A judgement for a prompt this session never showed its labeler (the page gets a 403)."""


class NothingToUndoError(Exception):
    """Undo with no judgement of this session left to take back (the page gets a 409)."""


class Session:
    """Serves the unlabelled prompts in order and records judgements (thread-safe).

    Args:
      prompts: all prompts (from `load_prompts`).
      k: answers per prompt.
      sampler: `sample(prompts, k) -> list[list[str]]`.
      log: the labeler's `RankingLog`; prompts in `log.done` are not asked again.
      seed: seeds the display order of each prompt's answers (with the labeler and the prompt).
    """

    def __init__(
        self, prompts: Sequence[str], k: int, sampler: Sampler, log: RankingLog, seed: int = 0
    ):
        if k < 2:
            raise FFTError(f"--k={k}: a ranking needs at least 2 answers per prompt.")
        self.prompts = list(prompts)
        self.k = k
        self.sampler = sampler
        self.log = log
        self.seed = seed
        self._pending = [i for i, p in enumerate(self.prompts) if p not in log.done]
        self._answers: dict[int, list[str]] = {}
        self._served: set[int] = set()  # prompts whose answers this labeler was shown
        self._history: list[tuple[int, dict]] = []  # this session's judgements, for undo
        self._state_lock = threading.Lock()  # pending list + file appends
        self._sample_lock = threading.Lock()  # one generation at a time (the model is shared)
        self._prefetching: set[int] = set()

    @property
    def total(self) -> int:
        return len(self.prompts)

    def progress(self) -> dict:
        with self._state_lock:
            return {"done": self.total - len(self._pending), "total": self.total}

    def _answers_for(self, i: int) -> list[str]:
        with self._sample_lock:
            if i not in self._answers:
                out = self.sampler([self.prompts[i]], self.k)
                if len(out) != 1 or len(out[0]) != self.k:
                    raise FFTError(
                        f"the sampler returned {out!r:.80}; expected 1 list of k={self.k}"
                    )
                self._answers[i] = [str(a) for a in out[0]]
            return self._answers[i]

    def prefetch(self, i: int) -> None:
        """Samples prompt i in the background so the page does not wait after a judgement."""
        with self._state_lock:
            if i in self._answers or i in self._prefetching:
                return
            self._prefetching.add(i)

        def run():
            try:
                self._answers_for(i)
            except Exception as e:  # noqa: BLE001 - reported again when the page asks for it
                print(f"fft.label: sampling prompt {i} failed: {e}", file=sys.stderr)
            finally:
                with self._state_lock:
                    self._prefetching.discard(i)

        threading.Thread(target=run, daemon=True).start()

    def shown_order(self, i: int) -> list[int]:
        """The order prompt i's answers are displayed in: a permutation of 0..k-1, seeded by the
        session seed, the labeler and the prompt text (the same on every reload and restart)."""
        key = f"{self.seed}\0{self.log.labeler}\0{self.prompts[i]}".encode()
        order = list(range(self.k))
        random.Random(zlib.crc32(key)).shuffle(order)
        return order

    def next_item(self) -> dict:
        """The first unlabelled prompt with its answers, plus progress; item None when done.

        Returns:
          `{"done", "total", "k", "labeler", "can_undo", "item"}`; item is `{"id", "prompt",
          "responses" (generation order), "shown" (indices in display order)}` or None.
        """
        with self._state_lock:
            pending = list(self._pending[:2])
            can_undo = bool(self._history)
        result = {**self.progress(), "k": self.k, "labeler": self.log.labeler,
                  "can_undo": can_undo, "item": None}  # fmt: skip
        if not pending:
            return result
        i = pending[0]
        answers = self._answers_for(i)
        with self._state_lock:
            self._served.add(i)
        if len(pending) > 1:
            self.prefetch(pending[1])
        result["item"] = {
            "id": i,
            "prompt": self.prompts[i],
            "responses": answers,
            "shown": self.shown_order(i),
        }
        return result

    def judge(self, payload: dict) -> dict:
        """Validates and records one judgement from the page.

        Args:
          payload: `{"id": int, "order": [indices best-first], "ties": [[i, j], ...]}` or
            `{"id": int, "skipped": true}`.

        Returns:
          The new progress.

        Raises:
          ValueError: the payload is malformed (the page gets a 400).
          KeyError: the prompt is not pending (already judged; the page gets a 409).
          NotServedError: the prompt was never served to this labeler (the page gets a 403).
        """
        i = payload.get("id")
        if type(i) is not int or not 0 <= i < self.total:  # bool is an int subclass
            raise ValueError("id: not a prompt id")
        record: dict = {"prompt": self.prompts[i]}
        if payload.get("skipped") is True:
            order, ties = None, []
        else:
            order = payload.get("order")
            ok = isinstance(order, list) and all(type(j) is int for j in order)
            if not ok or sorted(order) != list(range(self.k)):
                raise ValueError(f"order: must list each of 0..{self.k - 1} once, best first")
            ties = _check_ties(payload.get("ties") or [], self.k)
        with self._state_lock:
            if i not in self._pending:
                raise KeyError(i)
            if i not in self._served or i not in self._answers:
                raise NotServedError(i)  # e.g. prefetched, or guessed by a script
            record["responses"] = self._answers[i]
            if order is None:
                record["skipped"] = True
            else:
                record["ranking"] = [order.index(j) for j in range(self.k)]
                record["order"] = order
            record["shown"] = self.shown_order(i)
            record["labeler"] = self.log.labeler
            record["time"] = _now()
            if ties:
                record["ties"] = ties
            self.log.append(record)  # on disk before the page hears "ok"
            self._pending.remove(i)
            del self._answers[i]
            self._history.append((i, record))
        return self.progress()

    def undo(self) -> dict:
        """Takes back this session's last judgement or skip and asks that prompt again.

        The rankings file gets an undo line (`fft.data.labels`); nothing in it is rewritten.

        Returns:
          The new progress plus `"undone"`: the prompt id, which `next_item` serves next.

        Raises:
          NothingToUndoError: this session has no judgement left to take back.
        """
        with self._state_lock:
            if not self._history:
                raise NothingToUndoError()
            i, judged = self._history[-1]
            self.log.append(
                {
                    "prompt": self.prompts[i],
                    "undo": True,
                    "undone": "skip" if judged.get("skipped") else "ranking",
                    "labeler": self.log.labeler,
                    "time": _now(),
                }
            )
            self._history.pop()
            self._pending.insert(0, i)
            self._answers[i] = judged["responses"]  # the same answers as before, not resampled
        return {**self.progress(), "undone": i}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _check_ties(ties, k: int) -> list[list[int]]:
    if not isinstance(ties, list):
        raise ValueError("ties: must be a list of [i, j] pairs")
    out = set()
    for pair in ties:
        ok = isinstance(pair, list) and len(pair) == 2
        ok = ok and all(type(x) is int and 0 <= x < k for x in pair) and pair[0] != pair[1]
        if not ok:
            raise ValueError(f"ties: bad pair {pair!r}")
        out.add(tuple(sorted(pair)))
    return [list(p) for p in sorted(out)]


# --------------------------------------------------------------------------------------------
# The model sampler
# --------------------------------------------------------------------------------------------


def model_sampler(
    source: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.95,
    seed: int = 0,
) -> Sampler:
    """Loads a model with `fft.load` and returns a sampler over `fft.generate`.

    Args:
      source: an fft workdir or checkpoint, a local HF model directory, or a preset ('fft:tiny').
      max_new_tokens, temperature, top_k, top_p: sampling settings.
      seed: base seed; each prompt adds a hash of its text, so the same prompt gets the same
        answers in every session (labelers overlap, restarts show what was shown before).
    """
    if temperature <= 0:
        raise FFTError(f"--temperature={temperature}: must be > 0, or the K answers are identical.")
    import importlib

    api = importlib.import_module("fft.api")
    gen = importlib.import_module("fft.sampling")
    model, tokenizer = api.load(source)

    def sample(prompts: list[str], k: int) -> list[list[str]]:
        out = []
        for p in prompts:
            texts = gen.generate(
                model,
                tokenizer,
                [p] * k,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=(seed + zlib.crc32(p.encode("utf-8"))) % (2**31),
            )
            out.append(list(texts))
        return out

    return sample


# --------------------------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LabelServer(http.server.ThreadingHTTPServer):
    """The ranking page's server; `url` is what a browser opens (token included)."""

    daemon_threads = True

    def __init__(self, session: Session, host: str = "127.0.0.1", port: int = 8765, token=None):
        if not _is_loopback(host) and not token:
            token = secrets.token_urlsafe(18)
        self.session = session
        self.token = token or None
        self.loopback = _is_loopback(host)
        with open(_PAGE_PATH, encoding="utf-8") as f:
            self.page = f.read()
        if ":" in host:  # an IPv6 literal such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)
        self.port = self.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        query = f"/?token={urllib.parse.quote(self.token)}" if self.token else "/"
        self.url = f"http://{shown}:{self.port}{query}"

    def allowed_host(self, header: str | None) -> bool:
        """On loopback, only loopback Host headers: a rebinding DNS name never reaches the API."""
        if not self.loopback:
            return True
        names = {"127.0.0.1", "localhost", "[::1]"}
        return header in {f"{n}:{self.port}" for n in names}


_TOKEN_PAGE = b"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>fft: access token needed</title></head>
<body style="font:15px/1.5 system-ui,sans-serif;max-width:640px;margin:60px auto;padding:0 20px">
<h1 style="font-size:20px">This ranking page needs its access token</h1>
<p>This labeling server was started with an access token (it always is when it listens on
an address other than loopback), and every request must carry it.</p>
<ul>
<li>Open the URL that <code>python -m fft.label</code> printed when it started: it ends with
<code>/?token=...</code>.</li>
<li>Or add <code>?token=YOUR_TOKEN</code> to this address yourself (the token given with
<code>--token</code>).</li>
<li>Scripts send the header <code>X-FFT-Token: YOUR_TOKEN</code>.</li>
</ul></body></html>
"""


class _Handler(http.server.BaseHTTPRequestHandler):
    server: LabelServer
    server_version = "fft-label"
    sys_version = ""

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass  # the terminal is for the URL and errors, not one line per click

    # -- plumbing ---------------------------------------------------------------------------

    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the URL may carry the token
        self.send_header("X-Frame-Options", "DENY")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._send(code, body, "application/json; charset=utf-8")

    def _authorized(self) -> bool:
        if not self.server.allowed_host(self.headers.get("Host")):
            self._json(403, {"error": "unexpected Host header"})
            return False
        if self.server.token is None:
            return True
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        given = self.headers.get("X-FFT-Token") or (query.get("token") or [""])[0]
        if hmac.compare_digest(given.encode(), self.server.token.encode()):
            return True
        if urllib.parse.urlsplit(self.path).path.startswith("/api/"):
            self._json(
                401, {"error": "missing or wrong access token; open the URL printed at start"}
            )
        else:  # a person in a browser: say how to get in, not raw JSON
            csp = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'"
            self._send(
                401, _TOKEN_PAGE, "text/html; charset=utf-8", {"Content-Security-Policy": csp}
            )
        return False

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self):  # noqa: N802 - stdlib name
        if not self._authorized():
            return
        path = urllib.parse.urlsplit(self.path).path
        if path == "/":
            nonce = secrets.token_urlsafe(16)
            csp = (
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'"
            )
            body = self.server.page.replace("{{NONCE}}", nonce).encode("utf-8")
            self._send(200, body, "text/html; charset=utf-8", {"Content-Security-Policy": csp})
        elif path == "/api/next":
            try:
                self._json(200, self.server.session.next_item())
            except Exception as e:  # noqa: BLE001 - the page shows it; the server keeps going
                self._json(500, {"error": f"sampling failed: {e}"})
        elif path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self):  # noqa: N802 - stdlib name
        if not self._authorized():
            return
        route = urllib.parse.urlsplit(self.path).path
        if route not in ("/api/judge", "/api/undo"):
            return self._json(404, {"error": "not found"})
        # JSON only: a cross-site form cannot send it without a CORS preflight we never answer.
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return self._json(415, {"error": "Content-Type must be application/json"})
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= _MAX_BODY:
            return self._json(413, {"error": "bad body size"})
        try:
            payload = json.loads(self.rfile.read(length))
            if not isinstance(payload, dict):
                raise ValueError("body: must be a JSON object")
            if route == "/api/undo":
                return self._json(200, {"ok": True, **self.server.session.undo()})
            self._json(200, {"ok": True, **self.server.session.judge(payload)})
        except NothingToUndoError:
            self._json(409, {"error": "nothing to undo in this session"})
        except KeyError:
            self._json(409, {"error": "this prompt was already judged"})
        except NotServedError:
            self._json(403, {"error": "this prompt was never shown to you; judge the one shown"})
        except ValueError as e:
            self._json(400, {"error": str(e)})


def serve_in_thread(server: LabelServer) -> threading.Thread:
    """Runs `server.serve_forever` in a daemon thread (tests, notebooks); stop with shutdown()."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------------------------
# --report: counts per labeler and agreement where prompts overlap
# --------------------------------------------------------------------------------------------


def _prefers(record: dict, a: str, b: str) -> int:
    """+1 if the labeler put answer text a above b, -1 below, 0 for a tie."""
    index = {text: i for i, text in reversed(list(enumerate(record["responses"])))}
    ia, ib = index[a], index[b]
    if sorted((ia, ib)) in [sorted(t) for t in record.get("ties", [])]:
        return 0
    return 1 if record["ranking"][ia] < record["ranking"][ib] else -1


def summarize(paths: Sequence[str]) -> dict:
    """Counts per labeler and pairwise agreement between labelers on shared prompts.

    Agreement compares, for every pair of answer texts both labelers ranked for the same prompt,
    whether they ordered the pair the same way (a tie counts as its own outcome).

    Returns:
      `{"labelers": {name: {"ranked", "skipped", "ties"}}, "agreement": [{"a", "b", "prompts",
      "pairs", "agreement", "same_order"}]}`; agreement is None where there is no overlap.
    """
    latest: dict[tuple[str, str], dict] = {}  # (labeler, prompt) -> last judgement
    records = [r for path in paths for r in read_rankings(path)]
    for r in labels.live_judgements(records):  # undone judgements do not count
        latest[(str(r.get("labeler", "")), r["prompt"])] = r
    labelers: dict[str, dict] = {}
    for (name, _), r in sorted(latest.items()):
        c = labelers.setdefault(name, {"ranked": 0, "skipped": 0, "ties": 0})
        c["skipped" if r.get("skipped") else "ranked"] += 1
        c["ties"] += len(r.get("ties", []))
    agreement = []
    for a, b in itertools.combinations(sorted(labelers), 2):
        prompts = pairs = agree = same = 0
        for (name, prompt), ra in latest.items():
            rb = latest.get((b, prompt))
            if name != a or rb is None or ra.get("skipped") or rb.get("skipped"):
                continue
            common = [t for t in dict.fromkeys(ra["responses"]) if t in set(rb["responses"])]
            if len(common) < 2:
                continue
            prompts += 1
            hits = [
                _prefers(ra, x, y) == _prefers(rb, x, y)
                for x, y in itertools.combinations(common, 2)
            ]
            pairs, agree, same = pairs + len(hits), agree + sum(hits), same + all(hits)
        agreement.append(
            {
                "a": a,
                "b": b,
                "prompts": prompts,
                "pairs": pairs,
                "agreement": agree / pairs if pairs else None,
                "same_order": same / prompts if prompts else None,
            }
        )
    return {"labelers": labelers, "agreement": agreement}


def format_summary(summary: dict) -> str:
    """The `--report` text: a table of labelers and one line per labeler pair."""
    lines = [f"{'labeler':<20} {'ranked':>7} {'skipped':>8} {'ties':>5}"]
    for name, c in summary["labelers"].items():
        lines.append(f"{name or '(none)':<20} {c['ranked']:>7} {c['skipped']:>8} {c['ties']:>5}")
    if not summary["labelers"]:
        lines.append("(no judgements yet)")
    for g in summary["agreement"]:
        if g["pairs"]:
            lines.append(
                f"{g['a']} vs {g['b']}: {g['prompts']} shared prompts, {g['pairs']} answer pairs, "
                f"pairwise agreement {g['agreement']:.2f}, same order {g['same_order']:.2f}"
            )
        else:
            lines.append(f"{g['a']} vs {g['b']}: no shared ranked prompts")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m fft.label", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="fft workdir / checkpoint, local HF dir, or preset (fft:tiny)")
    p.add_argument("--prompts", help="JSONL file, one {'prompt': ...} per line")
    p.add_argument("--k", type=int, default=3, help="answers to rank per prompt")
    p.add_argument("--out", default="rankings.jsonl", help="rankings JSONL (appended)")
    p.add_argument("--labeler", default=None, help="labeler id recorded per judgement (user name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=None, help="access token (generated when host is not local)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", "--top-p", type=float, default=0.95)
    p.add_argument("--top_k", "--top-k", type=int, default=0)
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true", help="summarize --out (and FILES) and exit")
    p.add_argument("files", nargs="*", help="more rankings files for --report")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ranking page (or `--report`); returns the process exit code."""
    args = _parse(argv)
    try:
        if args.report:
            print(format_summary(summarize([args.out, *args.files])))
            return 0
        if not args.model or not args.prompts:
            raise FFTError("--model and --prompts are required (or use --report).")
        prompts = load_prompts(args.prompts)
        log = RankingLog(args.out, args.labeler or getpass.getuser())
        sampler = model_sampler(
            args.model,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        session = Session(prompts, args.k, sampler, log, seed=args.seed)
        server = LabelServer(session, args.host, args.port, args.token)
    except FFTError as e:
        print(f"fft.label: error: {e}", file=sys.stderr)
        return 2
    progress = session.progress()
    done, total = progress["done"], progress["total"]
    print(f"fft.label: {done} / {total} prompts already judged by {log.labeler}")
    print(f"fft.label: open {server.url}", flush=True)
    if session._pending:
        session.prefetch(session._pending[0])  # sample while the browser opens
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    progress = session.progress()
    print(f"\nfft.label: {progress['done']} / {progress['total']} judged; saved in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
