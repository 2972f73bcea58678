"""fft.label: prompts and rankings files, server guards, --report, the page in Chromium."""

import json
import re
import time
import urllib.error
import urllib.request

import pytest

from fft import label
from fft.config_lib import FFTError
from fft.data import labels, sources

PROMPTS = ["Reverse: a b c", "Sort: 3 1 2", "Translate: dog", "Add: 2 + 2"]


def fake_sampler(prompts, k):
    return [[f"answer {j + 1} to: {p}" for j in range(k)] for p in prompts]


def write_prompts(path, prompts=PROMPTS):
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    return str(path)


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def serve(tmp_path):
    """serve(labeler, sampler=fake, **server_kw) -> running LabelServer on a free port."""
    servers = []

    def start(labeler="alice", sampler=fake_sampler, prompts=PROMPTS, k=3, **kw):
        log = label.RankingLog(str(tmp_path / "rankings.jsonl"), labeler)
        server = label.LabelServer(label.Session(prompts, k, sampler, log), port=0, **kw)
        label.serve_in_thread(server)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


# --------------------------------------------------------------------------------------------
# Files and the session, no browser
# --------------------------------------------------------------------------------------------


def test_load_prompts_names_the_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n"b"\n{"prompt": "a"}\n')
    assert label.load_prompts(str(path)) == ["a", "b"]  # strings allowed, blanks and repeats not
    path.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(FFTError, match=r"p\.jsonl:2: not valid JSON"):
        label.load_prompts(str(path))
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(
        FFTError, match=r'p\.jsonl:2: expected an object with a non-empty string "prompt"'
    ):
        label.load_prompts(str(path))
    with pytest.raises(FFTError, match="no such file"):
        label.load_prompts(str(tmp_path / "missing.jsonl"))


def test_cli_reports_bad_prompts_without_traceback(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\nnot json\n')
    argv = ["--model=fft:micro", f"--prompts={path}", f"--out={tmp_path / 'r.jsonl'}"]
    assert label.main(argv) == 2
    err = capsys.readouterr().err
    assert "p.jsonl:2: not valid JSON" in err and "Traceback" not in err


def test_session_validates_and_survives_a_torn_line(tmp_path):
    out = tmp_path / "r.jsonl"
    session = label.Session(PROMPTS, 3, fake_sampler, label.RankingLog(str(out), "alice"))
    item = session.next_item()["item"]
    for bad in ({"id": item["id"], "order": [0, 0, 1]}, {"id": 99, "skipped": True},
                {"id": item["id"], "order": [0, 1, 2], "ties": [[1, 1]]}):  # fmt: skip
        with pytest.raises(ValueError):
            session.judge(bad)
    assert session.judge({"id": item["id"], "order": [2, 0, 1], "ties": [[2, 0]]})["done"] == 1
    with pytest.raises(KeyError):  # asked twice (a second tab): refused, not recorded twice
        session.judge({"id": item["id"], "order": [0, 1, 2]})
    with open(out, "a") as f:
        f.write('{"prompt": "Sort: 3 1 2", "respo')  # killed mid-write
    log = label.RankingLog(str(out), "alice")  # drops the torn tail
    assert log.done == {PROMPTS[0]}
    log.append({"prompt": PROMPTS[1], "skipped": True, "labeler": "alice"})
    records = read_lines(out)
    assert [r["prompt"] for r in records] == PROMPTS[:2]
    assert records[0]["order"] == [2, 0, 1] and records[0]["ties"] == [[0, 2]]
    assert records[0]["ranking"] == [1, 2, 0]  # rank of each response, 0 = best
    assert records[0]["responses"] == fake_sampler([PROMPTS[0]], 3)[0]


def test_summary_counts_and_agreement(tmp_path):
    resp = ["x", "y", "z"]
    rows = [
        {"prompt": "p1", "responses": resp, "ranking": [0, 1, 2], "labeler": "alice"},
        {"prompt": "p2", "responses": resp, "ranking": [2, 1, 0], "labeler": "alice"},
        {"prompt": "p3", "responses": resp, "skipped": True, "labeler": "alice"},
        # bob saw p1's answers in another order: agreement compares answer texts
        {"prompt": "p1", "responses": ["z", "x", "y"], "ranking": [2, 0, 1], "labeler": "bob"},
        {"prompt": "p2", "responses": resp, "ranking": [0, 1, 2], "labeler": "bob",
         "ties": [[0, 1]]},
    ]  # fmt: skip
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = label.summarize([str(path)])
    assert summary["labelers"]["alice"] == {"ranked": 2, "skipped": 1, "ties": 0}
    assert summary["labelers"]["bob"] == {"ranked": 2, "skipped": 0, "ties": 1}
    (pair,) = summary["agreement"]
    # p1: 3 of 3 pairs agree; p2: alice z>y>x, bob x=y>z: 0 of 3 agree.
    assert (pair["prompts"], pair["pairs"], pair["agreement"], pair["same_order"]) == (
        2,
        6,
        0.5,
        0.5,
    )
    text = label.format_summary(summary)
    assert "alice vs bob: 2 shared prompts" in text


def _get(url, headers=None, data=None):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_server_guards(serve):
    server = serve(token="s3cret")
    base = f"http://127.0.0.1:{server.port}"
    code, headers, body = _get(base + "/")
    # A person without the token gets a page that says how to pass it, not raw JSON.
    assert code == 401 and headers["Content-Type"].startswith("text/html")
    assert b"?token=" in body and b"X-FFT-Token" in body and b"s3cret" not in body
    code, headers, body = _get(base + "/api/next", {"X-FFT-Token": "wrong"})
    assert code == 401 and headers["Content-Type"].startswith("application/json")
    code, headers, body = _get(server.url)
    assert code == 200 and b"rank answers" in body
    assert "script-src 'nonce-" in headers["Content-Security-Policy"]
    assert "unsafe-inline" not in headers["Content-Security-Policy"]
    tok = {"X-FFT-Token": "s3cret"}
    assert _get(base + "/api/next", {**tok, "Host": "evil.example:80"})[0] == 403  # rebinding
    body = json.dumps({"id": 0, "skipped": True}).encode()
    assert _get(base + "/api/judge", {**tok, "Content-Type": "text/plain"}, body)[0] == 415
    # Not local: a token is generated and shown in the URL.
    remote = serve(host="0.0.0.0")
    assert remote.token and remote.url.endswith("?token=" + remote.token)
    assert _get(f"http://127.0.0.1:{remote.port}/api/next")[0] == 401


# --------------------------------------------------------------------------------------------
# The page in a real browser
# --------------------------------------------------------------------------------------------


def _open(browser, url):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1100, "height": 820})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    expect(page.locator(".card")).to_have_count(3)
    return page, errors


def _expect_progress(page, text):
    from playwright.sync_api import expect

    expect(page.locator("#progress-text")).to_have_text(re.compile("^" + re.escape(text)))


def _names(page):
    return page.locator(".card .name").all_inner_texts()


def _visual_state(page):
    """What the labeler sees per card, top to bottom: (name, rank text, placed, tied)."""
    return page.locator(".card").evaluate_all(
        """els => els.map(e => [e.querySelector('.name').textContent,
            e.querySelector('.rank').textContent, e.classList.contains('placed'),
            e.classList.contains('tied')])"""
    )


def test_rank_three_prompts_in_browser(serve, browser, tmp_path):
    from playwright.sync_api import expect

    server = serve(token="tok")  # the page must carry the token on its API calls
    shown = [server.session.shown_order(i) for i in range(len(PROMPTS))]
    assert any(s != [0, 1, 2] for s in shown)  # shuffled (seeded: the same on every run)
    page, errors = _open(browser, server.url)
    _expect_progress(page, "0 / 4")
    expect(page.locator("#prompt")).to_have_text(PROMPTS[0])
    # Shown in the shuffled order, numbered by position, and unranked until the labeler acts.
    answers = fake_sampler([PROMPTS[0]], 3)[0]
    expect(page.locator(".card .text")).to_have_text([answers[j] for j in shown[0]])
    expect(page.locator(".card .name")).to_have_text(["Answer 1", "Answer 2", "Answer 3"])
    assert page.locator(".card.placed").count() == 0 and page.locator(".card.unranked").count() == 3
    expect(page.locator(".card .rank")).to_have_text(["–unranked"] * 3)
    expect(page.locator("#submit-btn")).to_be_disabled()
    # Prompt 1, keys: answer 2 best, then 3 (answer 1 is last by elimination), Enter.
    page.keyboard.press("2")
    assert _visual_state(page)[0] == ["Answer 2", "1best", True, False]
    assert page.locator(".card.unranked").count() == 2
    page.keyboard.press("3")
    by_keys = _visual_state(page)
    assert by_keys == [["Answer 2", "1best", True, False], ["Answer 3", "2", True, False],
                       ["Answer 1", "3", True, False]]  # fmt: skip
    page.keyboard.press("Enter")
    _expect_progress(page, "1 / 4")
    # Prompt 2, drag: answer 3 onto the top half of the first card, then the submit button.
    # A drag gives the same visual state as keys (every card ranked and placed).
    expect(page.locator("#prompt")).to_have_text(PROMPTS[1])
    cards = page.locator(".card")
    cards.nth(2).drag_to(cards.nth(0), target_position={"x": 200, "y": 5})
    expect(page.locator(".card .name")).to_have_text(["Answer 3", "Answer 1", "Answer 2"])
    assert [row[1:] for row in _visual_state(page)] == [row[1:] for row in by_keys]
    page.click("#submit-btn")
    _expect_progress(page, "2 / 4")
    # Prompt 3: keys 3, 1, then T ties answer 1 with answer 3 above it.
    expect(page.locator("#prompt")).to_have_text(PROMPTS[2])
    for key in ("3", "1", "t"):
        page.keyboard.press(key)
    expect(page.locator(".card.tied .name")).to_have_text("Answer 1")
    page.screenshot(path="/tmp/fft_label.png")
    page.click("#submit-btn")
    _expect_progress(page, "3 / 4")
    page.click("#skip-btn")  # prompt 4
    _expect_progress(page, "4 / 4")
    expect(page.locator("#done-box")).to_be_visible()
    assert errors == []
    page.close()

    records = read_lines(tmp_path / "rankings.jsonl")
    assert [r["prompt"] for r in records] == PROMPTS
    s0, s1, s2 = shown[:3]
    assert [r.get("order") for r in records] == [
        [s0[1], s0[2], s0[0]], [s1[2], s1[0], s1[1]], [s2[2], s2[0], s2[1]], None
    ]  # fmt: skip
    for r in records[:3]:  # ranking[i] = rank of responses[i]
        assert r["ranking"] == [r["order"].index(i) for i in range(3)]
    assert [r.get("ties") for r in records] == [None, None, [sorted([s2[2], s2[0]])], None]
    assert records[3]["skipped"] is True
    for r, order in zip(records, shown, strict=True):
        assert r["shown"] == order  # the display order is in the line written
        assert r["labeler"] == "alice" and r["responses"] == fake_sampler([r["prompt"]], 3)[0]
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", r["time"])


def test_messages_clear_undo_and_a_conflict_moves_on(serve, browser, tmp_path):
    """Issue 22: a stale error stays; K printed as 'K'; no undo; a 409 leaves 'Not saved'."""
    from playwright.sync_api import expect

    server = serve()
    page, errors = _open(browser, server.url)
    status = page.locator("#status")
    page.keyboard.press("Enter")  # nothing ordered yet
    expect(status).to_have_text(re.compile(r"press 1…3 from best to worst"))
    page.keyboard.press("1")
    expect(status).to_have_text("")  # cleared by the change
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    _expect_progress(page, "1 / 4")
    page.keyboard.press("s")  # skips prompt 2 at once ...
    _expect_progress(page, "2 / 4")
    expect(page.locator("#undo-btn")).to_be_enabled()
    page.click("#undo-btn")  # ... and can take it back
    _expect_progress(page, "1 / 4")
    expect(page.locator("#prompt")).to_have_text(PROMPTS[1])
    expect(status).to_have_text(re.compile("Took back your last judgement"))
    lines = read_lines(tmp_path / "rankings.jsonl")
    assert [(r["prompt"], r.get("skipped"), r.get("undo")) for r in lines] == [
        (PROMPTS[0], None, None), (PROMPTS[1], True, None), (PROMPTS[1], None, True)
    ]  # fmt: skip
    assert lines[2]["undone"] == "skip" and lines[2]["labeler"] == "alice"
    # Another tab judges the prompt this page shows; submitting here gets a 409 and moves on.
    body = json.dumps({"id": 1, "order": [0, 1, 2]}).encode()
    assert _get(server.url + "api/judge", {"Content-Type": "application/json"}, body)[0] == 200
    page.keyboard.press("1")
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).to_have_text(PROMPTS[2])
    expect(status).to_have_text(re.compile("already judged"))
    _expect_progress(page, "2 / 4")
    page.keyboard.press("3")
    expect(status).to_have_text("")
    assert [e for e in errors if "409 (Conflict)" not in e] == []  # the browser logs the 409
    page.close()
    assert len(read_lines(tmp_path / "rankings.jsonl")) == 4  # the refused one wrote nothing


def test_cards_take_focus_and_arrow_keys_move_them(serve, browser):
    from playwright.sync_api import expect

    server = serve()
    page, _ = _open(browser, server.url)
    assert page.locator(".card").evaluate_all("els => els.map(e => e.tabIndex)") == [0, 0, 0]
    page.locator(".card").nth(2).focus()
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    expect(page.locator(".card .name")).to_have_text(["Answer 3", "Answer 1", "Answer 2"])
    focused = page.evaluate("document.activeElement.querySelector('.name').textContent")
    assert focused == "Answer 3"  # focus follows the moved card
    assert page.locator(".card.placed").count() == 3  # like a drag: the order is complete
    page.keyboard.press("ArrowDown")
    expect(page.locator(".card .name")).to_have_text(["Answer 1", "Answer 3", "Answer 2"])
    expect(page.locator("#submit-btn")).to_be_enabled()
    page.close()


def test_untrusted_answers_are_shown_as_text(serve, browser, tmp_path):
    from playwright.sync_api import expect

    evil = [
        "<script>document.title = 'pwned'</script>",
        "<img src=x onerror=\"document.title='pwned'\">",
        '</pre><b id="injected">bold</b>',
    ]
    server = serve(sampler=lambda ps, k: [evil for _ in ps], prompts=["<i>prompt</i>"])
    page, errors = _open(browser, server.url)
    shown = server.session.shown_order(0)
    expect(page.locator(".card .text")).to_have_text([evil[j] for j in shown])  # as text
    expect(page.locator("#prompt")).to_have_text("<i>prompt</i>")
    assert page.locator("#injected").count() == 0 and page.locator("#answers img").count() == 0
    assert page.title() == "fft · rank answers"
    assert errors == []
    page.close()


def test_restart_asks_only_unlabelled_prompts(serve, browser, tmp_path):
    from playwright.sync_api import expect

    first = serve()
    for _ in range(2):  # judge two prompts through the API, then "crash"
        item = json.loads(_get(first.url + "api/next")[2])["item"]
        body = json.dumps({"id": item["id"], "order": [0, 1, 2]}).encode()
        assert _get(first.url + "api/judge", {"Content-Type": "application/json"}, body)[0] == 200
    first.shutdown()

    again = serve()
    page, _ = _open(browser, again.url)
    _expect_progress(page, "2 / 4")
    expect(page.locator("#prompt")).to_have_text(PROMPTS[2])
    page.close()
    other = serve(labeler="bob")  # another labeler is asked everything
    assert json.loads(_get(other.url + "api/next")[2])["item"]["prompt"] == PROMPTS[0]


def test_real_generator_samples_k_answers():
    sample = label.model_sampler("fft:micro", max_new_tokens=6, temperature=1.0, top_p=0.95)
    first = sample(["The cat"], 3)
    assert len(first) == 1 and len(first[0]) == 3 and all(isinstance(a, str) for a in first[0])
    assert sample(["The cat"], 3) == first  # seeded by the prompt: every labeler sees the same


class _ByteTokenizer:
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, *, add_bos=False, add_eos=False):
        return [3 + b for b in text.encode("utf-8")]


def test_rankings_feed_the_reward_model_format(tmp_path):
    """What the page writes is what fft.data.formats' `ranking` format (reward model) reads."""
    formats = pytest.importorskip("fft.data.formats")
    out = tmp_path / "r.jsonl"
    session = label.Session(PROMPTS, 3, fake_sampler, label.RankingLog(str(out), "alice"))
    item = session.next_item()["item"]
    session.judge({"id": item["id"], "order": [2, 0, 1]})
    (record,) = read_lines(out)
    encoded = formats.encode_record(record, "ranking", _ByteTokenizer(), max_len=256)
    assert encoded["ranks"] == [1, 2, 0] and len(encoded["cand_tokens"]) == 3


def test_judgements_only_for_prompts_served_to_the_labeler(serve):
    """Issue 22: a POST could judge a prompt the page never showed (e.g. the prefetched one)."""
    server = serve()
    session = server.session
    item = json.loads(_get(server.url + "api/next")[2])["item"]
    assert item["id"] == 0 and item["shown"] == session.shown_order(0)
    deadline = time.time() + 10
    while 1 not in session._answers and time.time() < deadline:  # prompt 2 is prefetched
        time.sleep(0.02)
    assert 1 in session._answers
    body = json.dumps({"id": 1, "order": [0, 1, 2]}).encode()
    code, _, reply = _get(server.url + "api/judge", {"Content-Type": "application/json"}, body)
    assert code == 403 and b"never shown" in reply
    with pytest.raises(label.NotServedError):
        session.judge({"id": 2, "skipped": True})
    body = json.dumps({"id": 0, "order": [0, 1, 2]}).encode()
    assert _get(server.url + "api/judge", {"Content-Type": "application/json"}, body)[0] == 200


def test_undo_lines_are_honoured_by_every_reader(tmp_path):
    """The restart, --report and the reward model / DPO data all drop undone judgements."""
    out = tmp_path / "r.jsonl"
    session = label.Session(PROMPTS, 3, fake_sampler, label.RankingLog(str(out), "alice"))
    with pytest.raises(label.NothingToUndoError):
        session.undo()
    for order in ([2, 0, 1], [0, 1, 2]):
        i = session.next_item()["item"]["id"]
        session.judge({"id": i, "order": order})
    i = session.next_item()["item"]["id"]
    session.judge({"id": i, "skipped": True})
    assert session.undo()["undone"] == 2  # the skip
    assert session.undo()["undone"] == 1  # then the ranking before it
    assert session.next_item()["item"]["id"] == 1  # asked again, the same answers
    assert session.progress()["done"] == 1
    lines = read_lines(out)
    assert len(lines) == 5 and [bool(r.get("undo")) for r in lines] == [0, 0, 0, 1, 1]
    # A restart asks the undone prompts again.
    assert label.RankingLog(str(out), "alice").done == {PROMPTS[0]}
    # --report counts only what stands.
    assert label.summarize([str(out)])["labelers"]["alice"] == {
        "ranked": 1, "skipped": 0, "ties": 0
    }  # fmt: skip
    # The reward model (and DPO) read the file through labels.for_training.
    live = labels.for_training(sources.open_source(str(out)))
    assert [r["prompt"] for r in live] == [PROMPTS[0]] and live[0]["order"] == [2, 0, 1]
    # DPO from a rankings file: pairs of the live ranking only (3 pairs of prompt 1's 3 answers).
    import os

    from fft import config_lib
    from fft.methods import dpo

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_lib.load_config(os.path.join(repo, "configs", "dpo.py"), "smoke")
    with config.unlocked():
        config.data.train, config.data.format = str(out), "ranking"
    pairs = dpo.pair_records(config, None)
    assert len(pairs) == 3 and {p["prompt"] for p in pairs} == {PROMPTS[0]}
    # A file without undo lines or skips is passed through untouched.
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps(lines[0]) + "\n")
    src = sources.open_source(str(plain))
    assert labels.for_training(src) is src
    # An undo takes back the latest judgement of that labeler on that prompt only.
    rows = [{"prompt": "p", "labeler": "a", "ranking": [0, 1]},
            {"prompt": "p", "labeler": "b", "ranking": [1, 0]},
            {"prompt": "p", "labeler": "a", "skipped": True},
            {"prompt": "p", "labeler": "a", "undo": True},
            {"prompt": "q", "labeler": "a", "undo": True}]  # fmt: skip
    assert labels.live_judgements(rows) == rows[:2]
