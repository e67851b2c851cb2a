"""The zero-shot vs fine-tuned table of a run: one source for results.md, `multitune eval` and
the HTML report."""

from __future__ import annotations

import math

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
    one source for results.md and the HTML report. `n` is the number of rows each figure was
    scored on; a share of rows (accuracy, exact match) carries its 95% Wilson interval."""
    columns = [c for c in ("zero_shot", "fine_tuned") if c in results]
    both = len(columns) == 2
    header = ["task", "metric", "n", *(c.replace("_", "-") for c in columns)] + (["Δ"] if both else [])
    rows = []
    for task in cfg.tasks:
        sizes = [results[c]["tasks"].get(task.name, {}).get("n") for c in columns]
        n_cell = " / ".join(str(n) for n in dict.fromkeys(s for s in sizes if s is not None)) or "-"
        for metric in _metrics_of(task, results, columns):
            vals = [results[c]["tasks"].get(task.name, {}).get(metric) for c in columns]
            cells = [metric_cell(v, metric, n) for v, n in zip(vals, sizes, strict=True)]
            row = [task.name, metric, n_cell, *cells]
            if both:
                a, b = vals
                row.append(f"{b - a:+.1f}" if a is not None and b is not None else "-")
            rows.append(row)
    means = [results[c].get("mean") for c in columns]
    if any(m is not None for m in means):
        row = ["**mean**", "primary", "", *(f"{m:.1f}" if m is not None else "-" for m in means)]
        if both:
            row.append(f"{means[1] - means[0]:+.1f}" if None not in means else "-")
        rows.append(row)
    return header, rows


PROPORTIONS = ("accuracy", "exact_match")  # a per-row 0/1 outcome: a binomial share of n rows


def metric_cell(value, metric: str, n: int | None) -> str:
    if not isinstance(value, int | float):
        return "-"
    if metric in PROPORTIONS and n:
        lo, hi = wilson_interval(value / 100, n)
        return f"{value:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{value:.1f}"


def wilson_interval(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a share `p` of `n` rows: unlike p +- z * se it stays inside
    [0, 1] and keeps its coverage at small n and at shares near 0 or 1 (Wilson 1927)."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _metrics_of(task, results: dict, columns: list[str]) -> list[str]:
    first = primary_metric(task)
    names = [first]
    for c in columns:
        for name in results[c]["tasks"].get(task.name, {}):
            if name not in names and name != "n":
                names.append(name)
    return names
