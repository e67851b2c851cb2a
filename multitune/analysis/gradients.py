"""Gradient geometry of per-task gradients ``G`` (K, P) (`training/surgery.per_task_grads`):
pairwise cosines, the share of conflicting pairs, magnitude similarity (Yu et al. 2020), and
their running average over a run."""

from __future__ import annotations

import torch


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
