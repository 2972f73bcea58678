"""fft.report: reading workdirs (finished and live), plots, the HTML page in a real browser."""

import json
import math
import os

import pytest

from fft import report
from fft.config_lib import FFTError


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
    assert {"report_loss.png", "report_lr.png", "report_exact_match.png"} <= set(pngs)


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
    assert page.title().startswith("fft report")  # the <script> in a sample did not run
    assert page.locator("td.text", has_text="<script>document.title").count() == 4
    assert errors == []
    shot = "/tmp/fft_report.png"
    page.screenshot(path=shot, full_page=True)
    page.close()
    with Image.open(shot) as im:
        stat = ImageStat.Stat(im.convert("L"))
        assert stat.stddev[0] > 10, "screenshot looks blank"
