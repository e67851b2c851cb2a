"""The end result of multi-task training: Δm, the average relative gap of a multi-task model to
single-task baselines (Maninis et al. 2019; Vandenhende et al. 2021), per task and overall."""

from __future__ import annotations

from multitune.errors import MultituneError


def _check_metrics(multi: dict[str, float], single: dict[str, float], higher_is_better: dict[str, bool]) -> list[str]:
    tasks = list(single)
    if not tasks:
        raise MultituneError("delta_m needs at least one task; got none")
    for what, table in (("multi-task", multi), ("higher_is_better", higher_is_better)):
        if set(table) != set(tasks):
            raise MultituneError(
                f"{what} results cover tasks {sorted(table)}, but single-task results cover {sorted(tasks)}"
            )
    for t in tasks:
        if single[t] == 0:
            raise MultituneError(f"single-task metric for task {t!r} is 0; Δm divides by it")
    return tasks


def _relative(multi: float, single: float, higher: bool) -> float:
    """Sign-corrected relative gap in percent: positive means the multi-task model is better."""
    sign = 1.0 if higher else -1.0
    return sign * (multi - single) / single * 100.0


def delta_m(multi: dict[str, float], single: dict[str, float], higher_is_better: dict[str, bool]) -> float:
    """Δm in PERCENT (Maninis et al. 2019; Vandenhende et al. 2021).

    Δm = (100 / K) * sum_k (-1)^{l_k} (M_mt,k - M_st,k) / M_st,k, with l_k = 1 when lower is
    better for task k's metric: the average relative gain of the multi-task model over the
    single-task baselines, positive when multi-task training helps on average.
    """
    tasks = _check_metrics(multi, single, higher_is_better)
    gaps = [_relative(float(multi[t]), float(single[t]), bool(higher_is_better[t])) for t in tasks]
    return sum(gaps) / len(gaps)


def compare_table(multi: dict[str, float], single: dict[str, float], higher_is_better: dict[str, bool]) -> dict:
    """Multi-task vs single-task, per task and overall.

    Returns ``{"tasks": {task: {"multi", "single", "delta", "relative_delta"}}, "delta_m",
    "below_baseline", "worst_task"}``: ``delta`` is the raw difference multi - single,
    ``relative_delta`` the sign-corrected relative difference in percent (positive = better than
    single-task, whatever the metric's direction), ``below_baseline`` the number of tasks with a
    negative ``relative_delta``, ``worst_task`` the task with the lowest one (first on ties).
    """
    tasks = _check_metrics(multi, single, higher_is_better)
    rows = {}
    for t in tasks:
        m, s = float(multi[t]), float(single[t])
        rows[t] = {
            "multi": m,
            "single": s,
            "delta": m - s,
            "relative_delta": _relative(m, s, bool(higher_is_better[t])),
        }
    worst = min(tasks, key=lambda t: rows[t]["relative_delta"])
    return {
        "tasks": rows,
        "delta_m": sum(r["relative_delta"] for r in rows.values()) / len(rows),
        "below_baseline": sum(1 for r in rows.values() if r["relative_delta"] < 0),
        "worst_task": worst,
    }
