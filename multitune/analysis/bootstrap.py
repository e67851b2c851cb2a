"""Is a difference between two models a gain or noise? Seeds and a paired bootstrap over dev rows.

Two sources of noise separate two fine-tunes: the training seed (init, dropout, data order) and
the finite dev split. The first is shown by mean ± std over seeds; the second by a paired
bootstrap (Efron & Tibshirani 1993; Koehn 2004 for NLP): both models scored the same rows, so the
rows of each task are resampled with replacement, the same draw for both models, and the
difference is recomputed for every resample. The 2.5th and 97.5th percentiles of those
differences are the 95% interval; an interval that excludes 0 is a difference the dev split
supports. With several seeds, each model's per-row score is first averaged over its seeds.

`numpy` draws the resamples; no library computes a paired bootstrap of Δm over several tasks.
"""

from __future__ import annotations

import statistics

import numpy as np

from multitune.errors import MultituneError


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value)."""
    if not values:
        raise MultituneError("mean_std of no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_mean_rows(runs: list[list[float]]) -> np.ndarray:
    """Each row's score averaged over seeds: (seeds, rows) -> (rows,)."""
    lengths = {len(r) for r in runs}
    if len(lengths) != 1:
        raise MultituneError(f"the seeds scored different numbers of rows: {sorted(lengths)}")
    return np.asarray(runs, dtype=np.float64).mean(axis=0)


def paired_bootstrap(
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    higher_is_better: dict[str, bool],
    resamples: int = 5000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Intervals of model a against model b from per-row scores of the same rows.

    Returns {"tasks": {task: {"delta": [lo, hi], "relative_delta": [lo, hi], "p_better": p}},
    "delta_m": [lo, hi], "p_better": p}: `delta` is a - b in metric units, `relative_delta` the
    sign-corrected relative difference in percent (as Δm's terms), Δm their mean over tasks, and
    `p_better` the share of resamples in which a is better (relative difference > 0).
    """
    tasks = list(b)
    if set(a) != set(b):
        raise MultituneError(f"per-row scores cover tasks {sorted(a)} and {sorted(b)}: not the same")
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2 * 100
    out: dict = {"tasks": {}}
    relative_draws = []
    for t in tasks:
        x, y = np.asarray(a[t], dtype=np.float64), np.asarray(b[t], dtype=np.float64)
        if x.shape != y.shape or x.ndim != 1 or not len(x):
            raise MultituneError(f"task {t}: the two models scored {len(x)} and {len(y)} rows; they must be the same")
        idx = rng.integers(0, len(x), size=(resamples, len(x)))
        mx, my = x[idx].mean(axis=1), y[idx].mean(axis=1)
        sign = 1.0 if higher_is_better[t] else -1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(my != 0, sign * (mx - my) / my * 100.0, np.nan)
        relative_draws.append(rel)
        out["tasks"][t] = {
            "delta": _interval(mx - my, tail),
            "relative_delta": _interval(rel, tail),
            "p_better": float(np.mean(rel > 0)),
        }
    dm = np.mean(relative_draws, axis=0)
    out["delta_m"] = _interval(dm, tail)
    out["p_better"] = float(np.mean(dm > 0))
    return out


def _interval(draws: np.ndarray, tail: float) -> list[float]:
    lo, hi = np.nanpercentile(draws, [tail, 100 - tail])
    return [float(lo), float(hi)]
