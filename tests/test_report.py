"""`multitune report`: the HTML page of a run, from a real tiny run."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import matplotlib.image
import pytest
from conftest import task_rte, task_sst2

from multitune import rundir
from multitune.cli import main
from multitune.config import validate_config
from multitune.reporting import write_report
from multitune.reporting.log import RUN_WIDE, read_metrics, series
from multitune.reporting.tables import results_rows
from multitune.training.loop import train


def _images(page: str) -> dict[str, bytes]:
    found = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">', page)
    return {alt: base64.b64decode(data) for alt, data in found}


def _cells(page: str, first_row: str) -> list[list[str]]:
    """The text of every cell of the table whose header row starts with `first_row`."""
    table = page[page.index(f"<tr><th>{first_row}</th>") :]
    table = table[: table.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", r)] for r in rows]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    cfg = validate_config(
        {
            "model": str(tiny_model_dir),
            "method": {"name": "lora", "rank": 4, "alpha": 8},
            "tasks": [task_sst2(), task_rte()],
            "train": {
                "max_steps": 6,
                "batch_size": 4,
                "lr": 1e-3,
                "max_length": 96,
                "log_every": 2,
                "eval_every": 3,
                "interference_every": 2,
                "balance": {"method": "dwa"},
                "seed": 0,
            },
            "eval": {"max_new_tokens": 6, "batch_size": 8, "zero_shot": True},
            "output": str(out),
        }
    )
    train(cfg)
    return out, cfg


def test_report_holds_the_results_table_and_a_chart_per_logged_figure(finished_run, capsys):
    run, cfg = finished_run
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run / 'report.html'}"
    page = (run / "report.html").read_text(encoding="utf-8")

    header, rows = results_rows(rundir.read_results(run), cfg)
    assert _cells(page, "task") == [header] + [[c.strip("*") for c in row] for row in rows]
    assert len(rows) == 5  # accuracy and macro_f1 of two tasks, and the mean

    images = _images(page)
    assert set(images) == {
        "training loss per task (mean token NLL)",
        "learning rate",
        "gradient norm (before clipping)",
        "task weights (train.balance)",
        "dev: primary metric per task",
        "gradient cosine per task pair",
        "share of conflicting task pairs",
        "Mean gradient cosine per task pair (train.interference_every)",
    }
    for alt, png in images.items():
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100, alt
    assert "6</td>" in page and "sst2 (classification), rte (classification)" in page
    assert "max_steps: 6" in page  # the configuration, verbatim


def test_series_are_the_logged_figures(finished_run):
    run, _ = finished_run
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = series(read_metrics(run / "metrics.jsonl"), "train", "loss")
    assert set(loss) == {RUN_WIDE, "sst2", "rte"}
    assert loss["sst2"] == (
        [r["step"] for r in lines if r["split"] == "train" and r.get("task") == "sst2"],
        [r["loss"] for r in lines if r["split"] == "train" and r.get("task") == "sst2"],
    )
    assert loss[RUN_WIDE][0] == [2, 4, 6]
    dev = series(read_metrics(run / "metrics.jsonl"), "dev", "accuracy")
    assert dev["rte"][0] == [3, 6]


def test_report_of_a_run_still_training(finished_run, tmp_path):
    run, _ = finished_run
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run / "config.yaml", partial)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    # the first logged step, and a last line cut off halfway through its writing
    first = [line for line in lines if json.loads(line)["step"] == 2]
    (partial / "metrics.jsonl").write_text("\n".join(first) + "\n" + lines[-1][:20])
    page = write_and_read(partial)
    assert "2 logged so far (training not finished)" in page
    assert "No evaluation results yet." in page
    assert "training loss per task (mean token NLL)" in _images(page)
    assert "dev: primary metric per task" not in _images(page)


def write_and_read(run: Path) -> str:
    assert main(["report", str(run), "--out", str(run / "r.html")]) == 0
    return (run / "r.html").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"step": 1, "split": "train"', ":2: not JSON (Expecting ',' delimiter)"),
        ('{"split": "train", "loss": 1.0}', ":2: field 'step' must be an integer, got None"),
        ('{"step": 1, "split": 3}', ":2: field 'split' must be a string, got 3"),
        ("[1, 2]", ":2: not a JSON object"),
    ],
)
def test_a_bad_metrics_line_is_one_error_and_leaves_the_old_report(finished_run, tmp_path, capsys, line, message):
    run, _ = finished_run
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(run / "config.yaml", bad)
    (bad / "report.html").write_text("earlier report")
    good = (run / "metrics.jsonl").read_text().splitlines()[0]
    (bad / "metrics.jsonl").write_text(f"{good}\n{line}\n{good}\n")
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"multitune: error: {bad / 'metrics.jsonl'}{message}"
    assert (bad / "report.html").read_text() == "earlier report"


def test_report_of_a_dir_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"multitune: error: {tmp_path / 'nowhere'} is not a run directory (no config.yaml)"


def test_delta_is_green_where_the_metric_got_better(tiny_model_dir):
    from multitune.reporting.page import _results

    text_task = {"name": "pub", "kind": "text", "data": {"dev": "x"}}
    cfg = validate_config({"model": str(tiny_model_dir), "tasks": [text_task, task_sst2()], "method": {"rank": 4}})
    results = {
        "zero_shot": {"tasks": {"pub": {"perplexity": 20.0}, "sst2": {"accuracy": 50.0, "macro_f1": 40.0}}},
        "fine_tuned": {"tasks": {"pub": {"perplexity": 18.0}, "sst2": {"accuracy": 60.0, "macro_f1": 30.0}}},
    }
    spans = re.findall(r'<span class="(up|down)">([^<]*)</span>', _results(cfg, results))
    assert spans == [("up", "-2.0"), ("up", "+10.0"), ("down", "-10.0")]


def test_results_and_report_say_where_the_run_ran(finished_run):
    import torch

    run, _ = finished_run
    results = rundir.read_results(run)
    env = results["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["cpu_count"] >= 1 and results["train"]["processes"] == 1
    assert main(["report", str(run), "--out", str(run.parent / "env.html")]) == 0
    page = (run.parent / "env.html").read_text()
    assert f"torch {torch.__version__}" in page and "<td>seed</td>" in page


def test_the_config_shows_the_keys_set_away_from_their_defaults(finished_run):
    run, _ = finished_run
    page = write_report(run, run.parent / "settings.html").read_text()
    settings = page.split("Settings away from their defaults:")[1].split("</table>")[0]
    cells = re.findall(r"<td>([^<]*)</td><td>([^<]*)</td>", settings)
    keys = dict(cells)
    assert keys["train.max_steps"] == "6" and keys["train.balance.method"] == "dwa" and keys["method.rank"] == "4"
    assert "train.weight_decay" not in keys and "train.scheduler" not in keys  # left at their defaults
    assert keys["tasks"] == "sst2, rte"


def test_several_runs_side_by_side(finished_run, tmp_path, capsys):
    run, cfg = finished_run
    other = cfg.model_copy(deep=True)
    other.train.lr, other.output = 3e-3, str(tmp_path / "faster")
    train(other)
    out = tmp_path / "both.html"
    assert main(["report", str(run), str(tmp_path / "faster"), "--out", str(out)]) == 0
    page = out.read_text()
    differ = page.split("Settings that differ")[1].split("</table>")[0]
    assert re.findall(r"<td>([^<]*)</td>", differ) == ["train.lr", "0.001", "0.003"]
    for name in (run, tmp_path / "faster"):
        done = rundir.read_results(name)["fine_tuned"]["tasks"]["sst2"]
        assert f"{done['accuracy']:.1f} [" in page and f"(n={done['n']})" in page
    assert page.count("<img ") == 4  # per task: training loss and dev accuracy, one line per run
    assert main(["report", str(run), str(tmp_path / "faster")]) == 2
    assert "needs --out FILE" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as Debian's chromium needs them headless as root on a machine without a network
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium (Debian: apt-get install chromium; .ci/run installs it)")
def test_the_page_renders_in_a_real_browser_with_nothing_from_outside(finished_run, tmp_path):
    """Headless Chromium opens the report: every image decodes, every request stays in the file
    (no network), no script error; a full-page screenshot is kept for a human to look at."""
    from playwright.sync_api import sync_playwright

    run, cfg = finished_run
    page_path = write_report(run)
    requests, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=2)
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(page_path.as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        text = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert len(images) == len(_images(page_path.read_text())) >= 4
    assert all(complete and width >= 300 for _, complete, width in images), [i for i in images if i[2] < 300]
    assert requests[0] == page_path.as_uri() and all(u.startswith("data:") for u in requests[1:]), requests
    assert errors == []
    lines = text.splitlines()
    for task in cfg.task_names:  # the results table as a reader sees it: task, metric, n, ...
        done = rundir.read_results(run)["fine_tuned"]["tasks"][task]
        assert any(line.startswith(f"{task}\taccuracy\t{done['n']}\t") for line in lines), lines
    shot = matplotlib.image.imread(str(tmp_path / "report.png"))
    assert shot.shape[1] == 2560 and shot.shape[0] > 1800  # HiDPI, and the whole page, not one screen
