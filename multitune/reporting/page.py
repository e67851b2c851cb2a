"""The report page: everything a run left behind, on one HTML file that opens anywhere.

Plots are embedded as base64 PNGs, so the file can be mailed or attached to an issue without the
run directory; TensorBoard (RUN/tb) stays the tool for live, interactive curves.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from multitune import rundir
from multitune.config import RunConfig, flat_config
from multitune.errors import MultituneError
from multitune.files import write_atomic
from multitune.reporting.log import RUN_WIDE, read_metrics, series
from multitune.reporting.plots import line_chart
from multitune.reporting.tables import metric_cell, results_rows
from multitune.tasks.metric_info import higher_is_better, primary_metric

REPORT = rundir.REPORT
IMAGES = {
    rundir.INTERFERENCE_PNG: "Mean gradient cosine per task pair (train.interference_every)",
    rundir.AFFINITY_PNG: "Lookahead task affinity (multitune affinity / train.affinity_every)",
    rundir.GATES_PNG: "Gate weights per task (multitune gates)",
}
TEXTS = {rundir.AFFINITY_MD: "Task affinity and proposed clusters", rundir.COMPARE_MD: "Single-task vs multi-task"}
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 10px; text-align: right; }
th:first-child, td:first-child, td:nth-child(2) { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; font-size: 85%; }
.up { color: #17603a; } .down { color: #a11; }
"""


# marks a page as ours: an existing file is replaced only when it carries this
GENERATOR = '<meta name="generator" content="multitune">'


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN/report.html (or `out`) from what the run dir holds now: it works on a finished run
    and on one still training, and needs no model."""
    run_dir = Path(run_dir)
    cfg = rundir.load_run_config(run_dir)
    results = rundir.read_results(run_dir)
    records = read_metrics(run_dir / rundir.METRICS)
    body = [f"<h1>{_e(run_dir.name)}</h1>", _summary(cfg, results, records), _results(cfg, results)]
    for title, charts in _charts(cfg, records):
        if charts:
            body.append(f"<h2>{_e(title)}</h2>")
            body += [_img(line_chart(*chart), chart[0]) for chart in charts]
    for name, caption in IMAGES.items():
        if (run_dir / name).is_file():
            body += [f"<h2>{_e(caption)}</h2>", _img((run_dir / name).read_bytes(), caption)]
    for name, caption in TEXTS.items():
        if (run_dir / name).is_file():
            body += [f"<h2>{_e(caption)}</h2>", _markdown((run_dir / name).read_text(encoding="utf-8"))]
    config = _e((run_dir / rundir.CONFIG).read_text(encoding="utf-8"))
    body += ["<h2>Configuration</h2>", _settings(cfg)]
    body.append(f"<details><summary>the whole config.yaml</summary><pre>{config}</pre></details>")
    return _write(body, run_dir.name, Path(out) if out is not None else run_dir / REPORT, out is not None)


def write_comparison(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One page putting several runs side by side: the settings that differ, each task's primary
    metric after fine-tuning (with n and its interval), and each task's training loss and dev
    metric with one line per run."""
    runs = [Path(r) for r in run_dirs]
    names = [r.name for r in runs] if len({r.name for r in runs}) == len(runs) else [str(r) for r in runs]
    cfgs = [rundir.load_run_config(r) for r in runs]
    results = [rundir.read_results(r) for r in runs]
    records = [read_metrics(r / rundir.METRICS) for r in runs]
    body = [f"<h1>{_e(' vs '.join(names))}</h1>", "<h2>Settings that differ</h2>", _differences(names, cfgs)]
    specs = {t.name: t for cfg in cfgs for t in cfg.tasks}
    rows = []
    for task, spec in specs.items():
        metric = primary_metric(spec)
        cells = []
        for done in results:
            figures = done.get("fine_tuned", {}).get("tasks", {}).get(task)
            cells.append(f"{metric_cell(figures[metric], metric, figures['n'])} (n={figures['n']})" if figures else "-")
        rows.append([task, metric, *cells])
    means = [done.get("fine_tuned", {}).get("mean") for done in results]
    rows.append(["**mean**", "primary", *(f"{m:.1f}" if m is not None else "-" for m in means)])
    body += ["<h2>Fine-tuned results</h2>", _table(["task", "metric", *names], rows), "<h2>Curves</h2>"]
    for task, spec in specs.items():
        metric = primary_metric(spec)
        for split, key, title, log_y in (
            ("train", "loss", "training loss", True),
            ("dev", metric, f"dev {metric}", False),
        ):
            lines = {}
            for name, recs in zip(names, records, strict=True):
                found = series(recs, split, key)
                if task in found:
                    lines[name] = found[task]
            if lines:
                body.append(_img(line_chart(f"{task}: {title}", lines, key, log_y), f"{task} {title}"))
    return _write(body, " vs ".join(names), Path(out), True)


def _write(body: list[str], title: str, target: Path, named: bool) -> Path:
    """The page, written atomically; a file named by the user is replaced only when it is one of ours."""
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}'
        f"<title>{_e(title)}: multitune report</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    if target.is_dir():
        raise MultituneError(f"report target {target} is a directory: name an .html file")
    if named and target.is_file() and GENERATOR.encode() not in target.read_bytes()[:4096]:
        raise MultituneError(f"report target {target} exists and is not a multitune report: not replaced")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, page)
    return target


def _summary(cfg: RunConfig, results: dict, records: list[dict]) -> str:
    train = results.get("train", {})
    tasks = ", ".join(f"{t.name} ({t.kind})" for t in cfg.tasks)
    method = cfg.method.name + (f", rank {cfg.method.rank}" if getattr(cfg.method, "rank", None) else "")
    logged = max((r["step"] for r in records if r["split"] == "train"), default=0)
    items = [
        ("model", cfg.model),
        ("method", method),
        ("tasks", tasks),
        ("steps", f"{train['steps']}" if "steps" in train else f"{logged} logged so far (training not finished)"),
    ]
    if "trainable_parameters" in train:
        n, total = train["trainable_parameters"], train["total_parameters"]
        items.append(("trainable parameters", f"{n:,} of {total:,} ({100 * n / total:.2f}%)"))
    if "seconds" in train:
        items.append(
            (
                "training time",
                f"{train['seconds']:.0f} s, {train['tokens_per_s']} tokens/s, "
                f"{100 * train['padding_fraction']:.1f}% padding",
            )
        )
    if any(train.get("truncated_rows", {}).values()):
        cut = ", ".join(f"{t} {n}" for t, n in train["truncated_rows"].items() if n)
        items.append(("rows cut to max_length", cut))
    if "retention" in results:
        r = results["retention"]
        items.append(
            ("general-text perplexity", f"{r['before']:.2f} before, {r['after']:.2f} after ({r['change_pct']:+.1f}%)")
        )
    env = results.get("environment")
    if env:
        items.append(("seed", cfg.train.seed))
        items.append(
            (
                "run on",
                f"{env['date']}, {env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, "
                f"{env['cpu_count']} CPU cores, {env['torch_threads']} torch threads, {env['platform']}",
            )
        )
        items.append(
            (
                "versions",
                ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
                + f", Python {env['python']}"
                + (f"; git {env['git_commit']}" if env.get("git_commit") else ""),
            )
        )
    return "<table>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(str(v))}</td></tr>" for k, v in items) + "</table>"


def _results(cfg: RunConfig, results: dict) -> str:
    if not any(c in results for c in ("zero_shot", "fine_tuned")):
        return "<p>No evaluation results yet.</p>"
    header, rows = results_rows(results, cfg)
    out = ["<h2>Results</h2>", "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = _e(cell.strip("*"))
            if cell.startswith("**"):
                text = f"<b>{text}</b>"
            if header[i] == "Δ" and cell[:1] in "+-" and cell != "-":  # green where the metric got better
                better = cell.startswith("+") == higher_is_better(row[1])
                text = f'<span class="{"up" if better else "down"}">{text}</span>'
            cells.append(f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _charts(cfg: RunConfig, records: list[dict]) -> list[tuple[str, list[tuple]]]:
    """(section, [(title, series, y label, log y)]) for every figure the log holds."""
    order = [t.name for t in cfg.tasks]

    def ordered(lines: dict, run_wide: str | None = None) -> dict:
        out = {k: lines[k] for k in order if k in lines}
        out |= {k: v for k, v in lines.items() if k not in out and k != RUN_WIDE}
        if run_wide is not None and RUN_WIDE in lines:
            out[run_wide] = lines[RUN_WIDE]
        return out

    def run_wide(split: str, key: str, label: str) -> dict:
        lines = series(records, split, key)
        return {label: lines[RUN_WIDE]} if RUN_WIDE in lines else {}

    loss = ordered(series(records, "train", "loss"), "all rows")
    training = [
        ("training loss per task (mean token NLL)", loss, "loss", True),
        ("learning rate", run_wide("train", "lr", "lr"), "lr", False),
        ("gradient norm (before clipping)", run_wide("train", "grad_norm", "grad norm"), "norm", False),
        ("task weights (train.balance)", ordered(series(records, "train", "weight")), "weight", False),
        ("domain loss (train.domain)", run_wide("train", "domain_loss", "domain loss"), "loss", False),
        ("domain classifier accuracy (DANN)", run_wide("train", "domain_accuracy", "accuracy"), "accuracy", False),
    ]
    scored, perplexity = {}, {}
    for task in cfg.tasks:
        metric = primary_metric(task)
        lines = series(records, "dev", metric)
        if task.name in lines:
            (perplexity if metric == "perplexity" else scored)[f"{task.name} ({metric})"] = lines[task.name]
    if scored:
        scored |= run_wide("dev", "mean", "mean")
    dev = [
        ("dev: primary metric per task", scored, "score (0-100)", False),
        ("dev: perplexity of text tasks", perplexity, "perplexity", True),
        ("general-text perplexity (retention)", run_wide("dev", "retention_perplexity", "ppl"), "perplexity", True),
    ]
    tasks_vs_tasks = [
        ("gradient cosine per task pair", ordered(series(records, "interference", "cosine")), "cosine", False),
        ("share of conflicting task pairs", run_wide("interference", "conflict_rate", "conflict rate"), "share", False),
        ("lookahead affinity (i>j: i's step on j's loss)", ordered(series(records, "affinity", "affinity")), "", False),
    ]
    sections = [("Training", training), ("Evaluation during training", dev), ("Tasks vs tasks", tasks_vs_tasks)]
    return [(section, [c for c in charts if c[1]]) for section, charts in sections]


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _settings(cfg: RunConfig) -> str:
    """The keys this run sets away from their defaults (the tasks by name)."""
    default = _defaults(cfg)
    flat = flat_config(cfg.model_dump(mode="json"))
    rows = [[k, str(v)] for k, v in flat.items() if not k.startswith("tasks.") and default.get(k, _MISSING) != v]
    rows.append(["tasks", ", ".join(t.name for t in cfg.tasks)])
    return "<p>Settings away from their defaults:</p>" + _table(["key", "value"], rows)


_MISSING = object()


def _defaults(cfg: RunConfig) -> dict:
    """Every key's default for a config of the same method (each section's own defaults)."""
    sections = {
        "method": type(cfg.method)(name=cfg.method.name),
        "mixing": type(cfg.mixing)(),
        "train": type(cfg.train)(),
        "eval": type(cfg.eval)(),
    }
    out = {}
    for name, model in sections.items():
        out.update(flat_config(model.model_dump(mode="json"), f"{name}."))
    for key, field in RunConfig.model_fields.items():
        if key not in sections and key != "tasks" and not field.is_required() and field.default_factory is None:
            out[key] = field.default
    return out


def _differences(names: list[str], cfgs: list[RunConfig]) -> str:
    flats = [flat_config(c.model_dump(mode="json")) for c in cfgs]
    keys = sorted({k for f in flats for k in f if k != "output"})
    rows = [[k, *(str(f.get(k, "-")) for f in flats)] for k in keys if len({str(f.get(k, "-")) for f in flats}) > 1]
    return _table(["key", *names], rows) if rows else "<p>Only their output folders differ.</p>"


def _markdown(text: str) -> str:
    """compare.md / affinity.md as HTML: their pipe tables as tables, every other line a paragraph.
    Ours rather than a markdown package: the two files hold nothing else, and a dependency for
    them would be more code than this."""
    out, table = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):  # not the separator row
                table.append(cells)
            continue
        if table:
            out.append(_table(table[0], table[1:]))
            table = []
        if line.strip():
            out.append(f"<p>{_e(line.strip())}</p>")
    return "".join(out)


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = [f"<td><b>{_e(c.strip('*'))}</b></td>" if c.startswith("**") else f"<td>{_e(c)}</td>" for c in row]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"
