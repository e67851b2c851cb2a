"""Measuring task interference: do the tasks help or hurt each other?

Three views, from cheap to expensive:

* gradient geometry on a matrix ``G`` (K, P) of per-task gradients (`multitune.training.surgery.
  per_task_grads`): pairwise cosines, the share of conflicting pairs, and magnitude similarity
  (Yu et al. 2020);
* lookahead affinity (TAG, Fifty et al. 2021): how much one task's SGD step lowers another task's
  loss, and a proposal of task groups from it;
* the end result: Δm, the average relative gap of a multi-task model to single-task baselines
  (Maninis et al. 2019; Vandenhende et al. 2021).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from multitune.errors import MultituneError
from multitune.files import atomic_path

MAX_CLUSTER_TASKS = 10


def _rows(G: torch.Tensor) -> torch.Tensor:
    if G.dim() != 2:
        raise ValueError(f"task gradients must have shape (K, P); got {tuple(G.shape)}")
    return G.detach().double()


def cosine_matrix(G: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of ``G``, (K, K) float64.

    A row with zero norm (a task without gradient) has cosine 0 with everything, itself included,
    rather than NaN; other diagonal entries are exactly 1.
    """
    g = _rows(G)
    norms = g.norm(dim=1)
    nonzero = norms > 0
    unit = g / torch.where(nonzero, norms, torch.ones_like(norms)).unsqueeze(1)
    cos = (unit @ unit.T).clamp(-1.0, 1.0)
    cos.fill_diagonal_(1.0)
    return cos * (nonzero.unsqueeze(0) & nonzero.unsqueeze(1))


def conflict_rate(cos: torch.Tensor) -> float:
    """Share of unordered task pairs i < j whose gradients conflict (cosine < 0); 0.0 for K < 2."""
    cos = torch.as_tensor(cos)
    k = cos.shape[0]
    if k < 2:
        return 0.0
    i, j = torch.triu_indices(k, k, offset=1)
    return float((cos[i, j] < 0).double().mean())


def magnitude_similarity(G: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude similarity (Yu et al. 2020): 2 |g_i| |g_j| / (|g_i|^2 + |g_j|^2), (K, K).

    1 for equal norms, towards 0 when one gradient dominates; PCGrad's analysis says conflicts hurt
    most when they come with very different magnitudes. Two zero gradients give 0 (no information).
    """
    norms = _rows(G).norm(dim=1)
    num = 2.0 * norms.unsqueeze(0) * norms.unsqueeze(1)
    den = norms.unsqueeze(0) ** 2 + norms.unsqueeze(1) ** 2
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


def _check_tasks(tasks: list[str], what: str) -> list[str]:
    names = list(tasks)
    if not names:
        raise MultituneError(f"{what} needs at least one task; got none")
    if len(set(names)) != len(names):
        raise MultituneError(f"{what} task names must be unique; got {names}")
    return names


def lookahead_affinity(
    params: list[torch.nn.Parameter],
    task_loss: Callable[[str], torch.Tensor],
    tasks: list[str],
    lr: float,
) -> dict[str, dict[str, float]]:
    """Lookahead inter-task affinity (TAG: Fifty et al. 2021, "Efficiently Identifying Task Groupings").

    For each task i: take one SGD step on L_i alone, theta' = theta - lr * grad L_i(theta), and
    measure every task's relative loss change, Z[i][j] = 1 - L_j(theta') / L_j(theta). Positive:
    i's update helps j; negative: it hurts j. ``task_loss(name)`` must do a deterministic forward
    (no dropout) of that task's rows of one fixed batch; L_j(theta) is evaluated once per task.
    The parameters are modified in place under no_grad and restored bit-identically afterwards,
    even on error; ``p.grad`` is not touched. One call is noisy: average many steps with
    `average_affinity`. A task with zero loss gets Z[i][j] = 0.
    """
    names = _check_tasks(tasks, "lookahead affinity")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr)) or lr <= 0:
        raise MultituneError(f"lookahead affinity lr must be a finite number > 0; got {lr!r}")
    params = list(params)
    base: dict[str, float] = {}
    grads: dict[str, list[torch.Tensor | None]] = {}
    for name in names:
        with torch.enable_grad():
            loss = task_loss(name)
            base[name] = float(loss.detach())
            grads[name] = list(torch.autograd.grad(loss, params, allow_unused=True)) if loss.requires_grad else []
    saved = [p.detach().clone() for p in params]
    affinity: dict[str, dict[str, float]] = {}
    try:
        for i in names:
            with torch.no_grad():
                for p, g in zip(params, grads[i], strict=False):
                    if g is not None:
                        p.add_(g.to(p.dtype), alpha=-lr)
                after = {j: float(task_loss(j)) for j in names}
                for p, original in zip(params, saved, strict=True):
                    p.copy_(original)
            affinity[i] = {j: (1.0 - after[j] / base[j]) if base[j] != 0 else 0.0 for j in names}
    finally:
        with torch.no_grad():
            for p, original in zip(params, saved, strict=True):
                p.copy_(original)
    return affinity


def average_affinity(matrices: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Entry-wise mean of affinity matrices over steps (TAG averages over training)."""
    if not matrices:
        raise MultituneError("average_affinity needs at least one affinity matrix; got none")
    tasks = list(matrices[0])
    for m in matrices:
        if list(m) != tasks or any(list(m[i]) != tasks for i in tasks):
            raise MultituneError(f"affinity matrices must all cover the same tasks in the same order ({tasks})")
    n = len(matrices)
    return {i: {j: sum(m[i][j] for m in matrices) / n for j in tasks} for i in tasks}


def _partitions(k: int, n: int) -> Iterator[list[int]]:
    """Every partition of range(k) into exactly n non-empty groups, once each, as group labels.

    Restricted growth strings: labels appear in order of first use (task 0 is in group 0), so
    each partition has one labelling and the labels already number groups by first task.
    """
    labels = [0] * k

    def extend(pos: int, used: int) -> Iterator[list[int]]:
        if pos == k:
            if used == n:
                yield list(labels)
            return
        if n - used > k - pos:  # not enough tasks left to open the remaining groups
            return
        for label in range(min(used + 1, n)):
            labels[pos] = label
            yield from extend(pos + 1, max(used, label + 1))

    if k >= 1:
        labels[0] = 0
        yield from extend(1, 1)


def propose_clusters(affinity: dict[str, dict[str, float]], n: int) -> dict[str, str]:
    """Group the tasks into ``n`` clusters of mutually helpful tasks (TAG's grouping step).

    Objective (a partition variant of TAG's): each task scores the mean affinity INTO it from the
    other members of its group, mean_j Z[j][t]; a task alone in its group scores 0; the partition
    with the highest total score wins. The search is exhaustive over all partitions into exactly n
    non-empty groups (at most 10 tasks), in a fixed order, keeping the first best on ties.
    Returns task -> cluster name, "c1", "c2", ... numbered by first task in ``affinity`` order,
    ready to paste as ``cluster: c1`` into a config.
    """
    tasks = _check_tasks(list(affinity), "propose_clusters")
    k = len(tasks)
    if k > MAX_CLUSTER_TASKS:
        raise MultituneError(f"propose_clusters searches all groupings and allows at most 10 tasks; got {k}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > k:
        raise MultituneError(
            f"number of clusters must be an integer between 1 and the number of tasks ({k}); got {n!r}"
        )
    for i in tasks:
        missing = [j for j in tasks if j not in affinity[i]]
        if missing:
            raise MultituneError(f"affinity for task {i!r} is missing task(s) {', '.join(map(repr, missing))}")
    z = [[float(affinity[i][j]) for j in tasks] for i in tasks]

    def score(labels: list[int]) -> float:
        total = 0.0
        for t in range(k):
            mates = [j for j in range(k) if j != t and labels[j] == labels[t]]
            if mates:
                total += sum(z[j][t] for j in mates) / len(mates)
        return total

    best_labels: list[int] | None = None
    best = -math.inf
    for labels in _partitions(k, n):
        s = score(labels)
        if s > best:
            best, best_labels = s, labels
    assert best_labels is not None
    return {task: f"c{label + 1}" for task, label in zip(tasks, best_labels, strict=True)}


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


def plot_matrix(
    matrix: torch.Tensor | list,
    names: list[str],
    path: str | Path,
    title: str,
    vmin: float = -1.0,
    vmax: float = 1.0,
    fmt: str = ".2f",
) -> None:
    """Heatmap of a (K, K) task matrix (cosines, affinities) with each value written in its cell.

    Diverging colormap centred between ``vmin`` and ``vmax`` (red negative, blue positive). The PNG
    is written atomically (temporary file in the same folder, then ``os.replace``), so a reader
    never sees a half-written plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = torch.as_tensor(matrix, dtype=torch.float64).numpy()
    names = list(names)
    if values.shape != (len(names), len(names)):
        raise MultituneError(f"plot_matrix needs a {len(names)}x{len(names)} matrix for {names}; got {values.shape}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    k = len(names)
    fig, ax = plt.subplots(figsize=(3.0 + 0.9 * k, 1.6 + 0.7 * k))
    try:
        image = ax.imshow(values, cmap="RdBu", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(k), names, rotation=45, ha="right")
        ax.set_yticks(range(k), names)
        span = max(abs(vmin), abs(vmax), 1e-12)
        for i, j in itertools.product(range(k), range(k)):
            strong = abs(values[i, j]) > 0.6 * span
            ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=8, color="w" if strong else "k")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)


class PairAverage:
    """Running mean of a task-by-task matrix over training steps, when each step sees only some
    of the tasks (a batch of 8 rows from 4 tasks often misses one): each pair is averaged over the
    steps that measured it; pairs never measured are None."""

    def __init__(self, tasks: list[str]):
        self.tasks = list(tasks)
        k = len(self.tasks)
        self.sums = [[0.0] * k for _ in range(k)]
        self.counts = [[0] * k for _ in range(k)]
        self.measurements = 0

    def add(self, present: list[int], matrix: torch.Tensor | list) -> None:
        """`matrix[a][b]` is the value for tasks `present[a]`, `present[b]`."""
        values = torch.as_tensor(matrix, dtype=torch.float64).tolist()
        for a, i in enumerate(present):
            for b, j in enumerate(present):
                self.sums[i][j] += values[a][b]
                self.counts[i][j] += 1
        self.measurements += 1

    def mean(self) -> list[list[float | None]]:
        k = len(self.tasks)
        return [
            [self.sums[i][j] / self.counts[i][j] if self.counts[i][j] else None for j in range(k)] for i in range(k)
        ]

    def state_dict(self) -> dict:
        return {"sums": self.sums, "counts": self.counts, "measurements": self.measurements}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.counts, self.measurements = state["sums"], state["counts"], state["measurements"]


def gradient_report(G: torch.Tensor, names: list[str]) -> tuple[dict, dict[str, dict]]:
    """What the trainer logs for one measurement: ({"conflict_rate": ...}, {"a~b": {"cosine",
    "magnitude_similarity"}}) for the tasks whose gradients are the rows of G."""
    cos, gms = cosine_matrix(G), magnitude_similarity(G)
    pairs = {
        f"{names[a]}~{names[b]}": {"cosine": float(cos[a, b]), "magnitude_similarity": float(gms[a, b])}
        for a in range(len(names))
        for b in range(a + 1, len(names))
    }
    return {"conflict_rate": conflict_rate(cos), "tasks": len(names)}, pairs
