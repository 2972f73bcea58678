"""fft.report: reading workdirs (finished and live), plots, the HTML page in a real browser;
fft.metrics' direction helper and end-of-run table that the report's summary shares."""

import io
import json
import math
import os
import re

import pytest

from fft import metrics, report
from fft.config_lib import FFTError

TASKS = ("arithmetic", "copy", "reverse")


def write_run(workdir, *, rlhf=False, finished=True, steps=120, scale=1.0):
    """A synthetic workdir: metrics.jsonl (train/eval[/rollout]), samples.jsonl, results.json."""
    os.makedirs(workdir, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        lr = 3e-4 * min(1.0, step / 10) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        loss = scale * (1.2 + 2.5 * math.exp(-step / 40)) + 0.08 * math.sin(step * 1.7)
        lines.append(
            {"step": step, "split": "train", "time": 1.7e9 + step, "loss": loss, "lr": lr,
             "grad_norm": 1.0 / (1 + step / 30), "tokens_per_s": 5000 + 30 * (step % 7)}
        )  # fmt: skip
        if step % 20 == 0 or step == 1:
            lines.append(
                {"step": step, "split": "eval", "time": 1.7e9 + step, "loss": loss + 0.1,
                 "ppl": math.exp(loss + 0.1), "exact_match": min(1.0, step / steps * 0.8)}
            )  # fmt: skip
        if rlhf:
            lines.append(
                {"step": step, "split": "rollout", "time": 1.7e9 + step,
                 "reward": math.log1p(step) * scale, "true_reward": 0.4 + step / (2 * steps),
                 "kl": 0.002 * step, "rollout_s": 1.5, "update_s": 0.5}
            )  # fmt: skip
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
        if not finished:
            f.write(f'{{"step": {steps + 1}, "split": "tra')  # a line being written
    with open(os.path.join(workdir, "samples.jsonl"), "w") as f:
        for step in (0, steps):
            f.write(
                json.dumps({"step": step, "prompt": "Reverse: a b c", "response": "c b a"}) + "\n"
            )
            bad = "<script>document.title='pwned'</script><b>not bold</b>"
            f.write(json.dumps({"step": step, "prompt": "Say hi", "response": bad}) + "\n")
    config = {"method": "rlhf" if rlhf else "instruction", "steps": steps, "optim": {"lr": 3e-4}}
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    if finished:
        results = {
            "method": config["method"],
            "config": config,
            "before": {"loss": 3.7, "exact_match": 0.0, "true_reward": 0.41},
            "after": {"loss": 1.25, "exact_match": 0.8, "true_reward": 0.9},
            "steps": steps,
            "wall_s": 312.5,
            "cost": {"tokens": 1_966_080, "train_flops": 4.2e15, "trainable_params": 294_912,
                     "total_params": 23_500_000, "peak_memory_bytes": 3 * 2**30},
        }  # fmt: skip
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f)
    return workdir


def test_finished_run_report(tmp_path):
    run = write_run(str(tmp_path / "sft"))
    out = report.build_report([run])
    assert out == os.path.join(run, "report.html")
    page = open(out).read()
    for text in (
        "Training",
        "Evaluation",
        "before",
        "after",
        "+0.8",
        "3 GiB",
        "1.97 M",
        "finished",
    ):
        assert text in page, text
    assert "<h2>RLHF</h2>" not in page  # no rollout lines, no RLHF section
    # Model text is escaped; the page's CSP allows no script at all.
    assert "&lt;script&gt;document.title" in page and "<script" not in page
    pngs = sorted(p for p in os.listdir(run) if p.endswith(".png"))
    assert {"report_loss.png", "report_lr.png", "report_eval_exact_match.png"} <= set(pngs)


def test_live_run_and_rlhf_sections(tmp_path):
    run = write_run(str(tmp_path / "ppo"), rlhf=True, finished=False, steps=30)
    metrics = report.read_metrics(run)
    assert max(r["step"] for r in metrics) == 30  # the torn last line is skipped
    assert report.read_results(run) is None
    out = report.build_report([run], str(tmp_path / "live.html"))
    page = open(out).read()
    assert "running" in page and "No results.json yet" in page
    names = set(os.listdir(tmp_path))
    assert {"live_reward.png", "live_kl.png", "live_time_split.png", "live_step_time.png"} <= names


def test_plot_runs_overlays_runs(tmp_path):
    from PIL import Image

    a = write_run(str(tmp_path / "a"))
    b = write_run(str(tmp_path / "b"), scale=1.3)
    png = report.plot_runs([a, b], "loss", str(tmp_path / "plots" / "loss.png"), split="train")
    with Image.open(png) as im:
        assert im.size[0] > 300
    with pytest.raises(FFTError, match="no_such_metric"):
        report.plot_runs([a], "no_such_metric", str(tmp_path / "x.png"))


def test_cli_several_workdirs(tmp_path, capsys):
    a = write_run(str(tmp_path / "lora"), rlhf=True)
    b = write_run(str(tmp_path / "full"), rlhf=True, finished=False, scale=0.9)
    out = str(tmp_path / "cmp" / "both.html")
    assert report.main([a, b, "--out", out]) == 0
    page = open(out).read()
    assert "lora" in page and "full" in page and "running" in page
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_report_page_in_browser(tmp_path, browser):
    from PIL import Image, ImageStat

    a = write_run(str(tmp_path / "ppo_lora"), rlhf=True)
    b = write_run(str(tmp_path / "ppo_full"), rlhf=True, finished=False, scale=0.85)
    out = report.build_report([a, b], str(tmp_path / "report.html"))
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto("file://" + out)
    imgs = page.locator("img")
    assert imgs.count() >= 8
    widths = imgs.evaluate_all("els => els.map(e => e.complete ? e.naturalWidth : 0)")
    assert all(w > 0 for w in widths), widths
    assert page.title().startswith("fft comparison")  # the <script> in a sample did not run
    assert page.locator("td.text", has_text="<script>document.title").count() == 4
    assert errors == []
    shot = "/tmp/fft_report.png"
    page.screenshot(path=shot, full_page=True)
    page.close()
    with Image.open(shot) as im:
        stat = ImageStat.Stat(im.convert("L"))
        assert stat.stddev[0] > 10, "screenshot looks blank"


# --------------------------------------------------------------------------------------------
# Instruction runs: per-task metrics ('exact_match/<task>'), summary first, samples by task
# --------------------------------------------------------------------------------------------


def write_instruction_run(workdir, *, steps=8, gain=0.5, tasks=TASKS):
    """A synthetic instruction workdir as fft.methods.instruction leaves it: eval only before and
    after (splits eval_before / eval_after) with per-task exact match, samples with reference,
    correctness and task ('group')."""
    os.makedirs(workdir, exist_ok=True)

    def evals(k):
        per_task = {f"exact_match/{t}": min(1.0, k * gain * (i + 1) / len(tasks))
                    for i, t in enumerate(tasks)}  # fmt: skip
        overall = sum(per_task.values()) / len(tasks)
        loss = 4.9 - 0.7 * k * gain
        return {"exact_match": overall, **per_task, "loss": loss, "ppl": math.exp(loss)}

    before, after = evals(0), evals(1)
    lines = [{"step": 0, "split": "eval_before", "time": 1.7e9, **before}]
    for step in range(2, steps + 1, 2):
        lines.append({"step": step, "split": "train", "time": 1.7e9 + step,
                      "loss": 4.6 - 0.1 * step * gain, "lr": 1e-3 * (1 - step / (steps + 1)),
                      "grad_norm": 4.0 / step, "tokens_per_s": 8000.0})  # fmt: skip
    lines.append({"step": steps, "split": "eval_after", "time": 1.7e9 + steps + 1, **after})
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    with open(os.path.join(workdir, "samples.jsonl"), "w") as f:
        for step in (0, steps):
            for i, task in enumerate(tasks * 2):
                right = step == steps and i % 2 == 0
                f.write(json.dumps({"step": step, "prompt": f"### Instruction: {task} #{i}",
                                    "response": "ok" if right else "??", "reference": f"ref{i}",
                                    "correct": right, "group": task}) + "\n")  # fmt: skip
    config = {"method": "instruction", "steps": steps}
    results = {"method": "instruction", "config": config, "before": before, "after": after,
               "steps": steps, "wall_s": 27.3,
               "cost": {"tokens": 13594, "train_flops": 1.67e10, "trainable_params": 139584,
                        "total_params": 139584, "peak_memory_bytes": 960176128}}  # fmt: skip
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    return workdir


def test_metric_names_with_a_slash_make_safe_png_names(tmp_path):
    """Issue 22: 'exact_match/arithmetic' became a directory in a PNG path and nothing was
    written. Now names are safe, and two eval points give one bar chart, not one-point curves."""
    run = write_instruction_run(str(tmp_path / "sft"))
    out = report.build_report([run])
    page = open(out).read()
    pngs = {p for p in os.listdir(run) if p.endswith(".png")}
    assert "report_eval_before_after.png" in pngs and "report_loss.png" in pngs
    assert not any("exact_match" in p for p in pngs)  # no per-metric one-point curves
    assert page.count("<img") == len(pngs) == 5  # loss, lr, grad norm, tokens/s, eval bars
    assert "arithmetic" in page and "results saved in" in page
    assert report.safe_name("exact_match/../x y") == "exact_match_.._x_y"
    assert report.safe_name("/..") == "plot"


def test_a_failing_plot_still_writes_the_page(tmp_path, monkeypatch, capsys):
    run = write_instruction_run(str(tmp_path / "sft"))

    def boom(*a, **k):
        raise ValueError("no bars today")

    monkeypatch.setattr(report, "_bars_png", boom)
    page = open(report.build_report([run])).read()
    assert "plot eval_before_after failed: ValueError: no bars today" in page
    assert "report_loss.png" in os.listdir(run)
    assert "no bars today" in capsys.readouterr().err


def test_summary_colours_changes_by_direction(tmp_path):
    """A falling loss or ppl is an improvement (green), a rising kl a regression (red)."""
    run = write_instruction_run(str(tmp_path / "sft"))
    with open(os.path.join(run, "results.json")) as f:
        results = json.load(f)
    results["before"]["kl"], results["after"]["kl"] = 0.1, 0.5
    with open(os.path.join(run, "results.json"), "w") as f:
        json.dump(results, f)
    page = open(report.build_report([run])).read()
    summary = page[page.index('id="summary"') : page.index("<h2>Training")]
    row = lambda name: summary[summary.index(f">{name}</th>") :].split("</tr>")[0]  # noqa: E731
    assert '<span class="better"' in row("loss") and "↓ lower" in row("loss")
    assert '<span class="better"' in row("ppl")
    assert '<span class="better"' in row("exact_match") and "↑ higher" in row("exact_match")
    assert '<span class="worse"' in row("kl") and "+400.0%" in row("kl")
    assert page.index('id="summary"') < page.index("<img")  # the summary comes first


def test_direction_and_relative_change():
    assert [
        metrics.metric_direction(m)
        for m in ("loss", "domain_ppl", "kl", "rollout_s", "general_bpb")
    ] == [-1] * 5
    higher = ("exact_match/arithmetic", "pairwise_accuracy", "true_reward", "win_rate", "acc")
    assert all(metrics.metric_direction(m) == 1 for m in higher)
    assert metrics.metric_direction("grad_norm") == 0 and metrics.metric_direction("lr") == 0
    assert metrics.relative_change(2.0, 1.5) == "-25.0%"
    assert metrics.relative_change(4.624e10, 52.28) == "÷8.84e+08"
    assert metrics.relative_change(0.0, 0.8) == "+0.8 (from 0)"
    assert metrics.relative_change(1.0, 30.0) == "×30"
    assert metrics.verdict("loss", 2.0, 1.5) == "better"
    assert metrics.verdict("exact_match", 0.5, 0.25) == "worse"


def test_end_of_run_table_says_where_and_which_way():
    """Issue 22: `domain_ppl 4.624e+10 -> 52.28, change -46244855653.48` read as a raw
    difference; the table now gives a relative change, the better direction and the path."""
    table = metrics.format_table(
        {"domain_ppl": 4.624e10, "exact_match": 0.1, "grad_norm": 2.0},
        {"domain_ppl": 52.28, "exact_match": 0.05, "grad_norm": 1.0},
        saved_to="/runs/x/results.json",
    )
    lines = table.splitlines()
    assert lines[0] == "results saved in /runs/x/results.json"
    assert lines[1].split() == ["metric", "better", "before", "after", "change"]
    assert lines[3].split() == ["domain_ppl", "lower", "4.624e+10", "52.2800", "÷8.84e+08",
                                "better"]  # fmt: skip
    assert lines[4].split() == ["exact_match", "higher", "0.1000", "0.0500", "-50.0%", "worse"]
    assert lines[5].split() == ["grad_norm", "?", "2.0000", "1.0000", "-50.0%"]
    assert "46244855653" not in table


def _check_first_screen(page):
    """The summary table is on the first screen, above the first plot."""
    table = page.locator("#results").bounding_box()
    img = page.locator("img").first.bounding_box()
    viewport = page.viewport_size
    assert table is not None and img is not None
    assert table["y"] >= 0 and table["y"] + table["height"] <= viewport["height"], table
    assert table["x"] + table["width"] <= viewport["width"]
    assert table["y"] + table["height"] <= img["y"], (table, img)


@pytest.fixture(scope="module")
def instruction_smoke(tmp_path_factory):
    """A real instruction smoke run (fft:micro, 4 steps; ~30 s on idle CPUs), its printed table."""
    import contextlib

    from fft import config_lib, main

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_lib.load_config(os.path.join(repo, "configs", "instruction.py"), "smoke")
    with config.unlocked():  # as short as tests/methods/test_instruction.py's smoke run
        config.steps, config.instruction.eval_examples = 4, 8
    workdir = str(tmp_path_factory.mktemp("smoke") / "sft")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main.run(config, workdir)
    return workdir, buf.getvalue()


def test_instruction_smoke_report_in_browser(instruction_smoke, browser):
    """Issue 22's done-when: the report of an instruction smoke run renders with per-task
    metrics, and its first screen is the summary table (above the first plot)."""
    from playwright.sync_api import expect

    workdir, printed = instruction_smoke
    # The run's own table names the results file and the better direction.
    assert f"results saved in {os.path.join(workdir, 'results.json')}" in printed
    assert re.search(r"\nexact_match/\w+ +higher ", printed)  # a per-task row
    assert report.main([workdir]) == 0
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto("file://" + os.path.join(workdir, "report.html"))
    with open(os.path.join(workdir, "results.json")) as f:
        task = next(k for k in json.load(f)["after"] if k.startswith("exact_match/"))
    expect(page.locator(f'#results th.sub[title="{task}"]')).to_have_count(1)  # per-task row
    _check_first_screen(page)
    widths = page.locator("img").evaluate_all("els => els.map(e => e.naturalWidth)")
    assert widths and all(w > 0 for w in widths)
    # Samples: every one with its reference and correctness, filterable by task.
    rows = page.locator("table.samples tr.s")
    n = rows.count()
    assert n == len({json.loads(x)["prompt"] for x in open(os.path.join(workdir, "samples.jsonl"))})
    assert page.locator("table.samples th", has_text="reference").count() == 1
    assert page.locator("table.samples .mark").count() == 2 * n  # right/wrong before and after
    chip = page.locator(".filters label").nth(1)  # the first task
    task = chip.inner_text().rsplit(" (", 1)[0]
    chip.click()
    visible = page.locator("table.samples tr.s:visible")
    assert 0 < visible.count() < n or n == 1
    expect(visible.locator("td").first).to_have_text(task)
    page.screenshot(path="/tmp/fft_report_instruction.png")
    assert errors == []
    page.close()


def test_comparison_page_in_browser(tmp_path, browser):
    """`fft.report A B --out cmp.html`: one table with a column group per run, overlaid curves."""
    from playwright.sync_api import expect

    a = write_instruction_run(str(tmp_path / "lora"), gain=0.4)
    b = write_instruction_run(str(tmp_path / "full"), gain=0.8)
    out = str(tmp_path / "cmp.html")
    assert report.main([a, b, "--out", out]) == 0
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto("file://" + out)
    assert page.title() == "fft comparison: lora, full"
    expect(page.locator("table#results")).to_have_count(1)
    expect(page.locator("#results tr").first.locator("th")).to_have_text(
        ["metric", "better", "lora", "full"]
    )
    # The better run's after value is marked on rows where the runs differ.
    best = page.locator("#results tr", has=page.locator("th", has_text="exact_match")).first
    expect(best.locator(".best")).to_have_text(metrics_fmt(0.8 * 2 / 3))
    _check_first_screen(page)
    assert page.locator("img[alt=loss]").count() == 1  # both runs on one loss plot
    assert page.locator("table.samples").count() == 2
    page.screenshot(path="/tmp/fft_report_compare.png", full_page=True)
    page.close()


def metrics_fmt(v):
    return f"{v:.4g}"
