"""Lookahead task affinity (TAG, Fifty et al. 2021): how much one task's SGD step lowers another
task's loss, averaged over measurements, and the task groups it proposes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from multitune.errors import MultituneError

MAX_CLUSTER_TASKS = 10


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
