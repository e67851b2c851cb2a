"""The zero-shot vs fine-tuned table of a run: one source for results.md, `multitune eval` and
the HTML report."""

from __future__ import annotations

from multitune.config import RunConfig
from multitune.tasks.metric_info import primary_metric


def results_table(results: dict, cfg: RunConfig) -> str:
    """The markdown form of `results_rows`."""
    header, rows = results_rows(results, cfg)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_rows(results: dict, cfg: RunConfig) -> tuple[list[str], list[list[str]]]:
    """Per task: primary metric (and the others), zero-shot vs fine-tuned, as formatted cells;
    one source for results.md and the HTML report."""
    columns = [c for c in ("zero_shot", "fine_tuned") if c in results]
    both = len(columns) == 2
    header = ["task", "metric", *(c.replace("_", "-") for c in columns)] + (["Δ"] if both else [])
    rows = []
    for task in cfg.tasks:
        for metric in _metrics_of(task, results, columns):
            vals = [results[c]["tasks"].get(task.name, {}).get(metric) for c in columns]
            row = [task.name, metric, *(f"{v:.1f}" if isinstance(v, int | float) else "-" for v in vals)]
            if both:
                a, b = vals
                row.append(f"{b - a:+.1f}" if a is not None and b is not None else "-")
            rows.append(row)
    means = [results[c].get("mean") for c in columns]
    if any(m is not None for m in means):
        row = ["**mean**", "primary", *(f"{m:.1f}" if m is not None else "-" for m in means)]
        if both:
            row.append(f"{means[1] - means[0]:+.1f}" if None not in means else "-")
        rows.append(row)
    return header, rows


def _metrics_of(task, results: dict, columns: list[str]) -> list[str]:
    first = primary_metric(task)
    names = [first]
    for c in columns:
        for name in results[c]["tasks"].get(task.name, {}):
            if name not in names and name != "n":
                names.append(name)
    return names
