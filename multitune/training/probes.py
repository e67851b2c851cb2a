"""Diagnostics measured while training: per-task gradient cosines (`train.interference_every`)
and lookahead task affinity (`train.affinity_every`), averaged over the run, stored in
results.json and drawn as heatmaps (RUN/interference.png, RUN/affinity.png). The measures
themselves are in multitune/analysis/ (gradients.py, affinity.py); this module decides when they run and keeps them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from multitune.analysis.affinity import lookahead_affinity
from multitune.analysis.gradients import PairAverage, cosine_matrix, gradient_report
from multitune.analysis.heatmap import plot_matrix
from multitune.config import RunConfig
from multitune.methods.task_context import task_context
from multitune.models.forward import per_row_nll, target_logprobs


class Probes:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        names = cfg.task_names
        self.averages = {
            "interference": PairAverage(names) if cfg.train.interference_every else None,
            "affinity": PairAverage(names) if cfg.train.affinity_every else None,
        }

    def wants_grads(self, step: int, micro: int) -> bool:
        every = self.cfg.train.interference_every
        return bool(every) and micro == 0 and step % every == 0

    def interference(self, grads: list[torch.Tensor], seen: list[int]) -> tuple[dict, dict]:
        """Cosines of this micro-batch's per-task gradients: (summary, per-pair figures)."""
        names = [self.cfg.task_names[k] for k in seen]
        summary, per_pair = gradient_report(grads, names)
        self.averages["interference"].add(seen, cosine_matrix(grads))
        return summary, per_pair

    def affinity(self, step: int, micro: int, model, rows, batch_of, params) -> dict | None:
        """TAG lookahead affinity on this step's rows when it is due (dropout off: the losses must be
        comparable); `batch_of` lays rows out as the training steps do. Per-pair figures or None."""
        every = self.cfg.train.affinity_every
        if not every or micro != 0 or step % every != 0:
            return None
        names = self.cfg.task_names
        by_task = {names[k]: batch_of([r for r in rows if r.task_id == k]) for k in sorted({r.task_id for r in rows})}

        def task_loss(name: str) -> torch.Tensor:
            batch = by_task[name]
            with task_context(batch.context_ids()):
                logp, idx = target_logprobs(model, batch)
                return per_row_nll(logp, idx, batch.n_rows, self.cfg.train.row_loss).mean()

        model.eval()
        try:
            z = lookahead_affinity(params, task_loss, list(by_task), self.cfg.train.affinity_lr or self.cfg.train.lr)
        finally:
            model.train()
        present = [names.index(t) for t in by_task]
        self.averages["affinity"].add(present, [[z[i][j] for j in by_task] for i in by_task])
        return {f"{i}>{j}": {"affinity": z[i][j]} for i in z for j in z}

    def state_dict(self) -> dict:
        return {k: v.state_dict() for k, v in self.averages.items() if v is not None}

    def load_state_dict(self, state: dict) -> None:
        for name, saved in state.items():
            if self.averages[name] is not None:
                self.averages[name].load_state_dict(saved)

    def results(self) -> dict:
        """results.json's `interference` / `affinity` entries."""
        return {
            name: {"tasks": self.cfg.task_names, "matrix": avg.mean(), "measurements": avg.measurements}
            for name, avg in self.averages.items()
            if avg is not None and avg.measurements
        }

    def plot(self, run_dir: Path) -> None:
        """Heatmap of each averaged matrix, coloured on the off-diagonal range (the diagonal, a task
        with itself, would wash everything else out)."""
        for name, avg in self.averages.items():
            if avg is None or not avg.measurements:
                continue
            matrix = [[float("nan") if v is None else v for v in row] for row in avg.mean()]
            off = [abs(v) for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j and v == v]
            span = max(off + [1e-9])
            if name == "interference":
                title = f"per-task gradient cosine\n(mean of {avg.measurements} steps)"
                plot_matrix(matrix, avg.tasks, run_dir / f"{name}.png", title, -span, span, fmt="+.3f")
            else:
                title = f"lookahead affinity, row's step helps column\n(mean of {avg.measurements} steps)"
                plot_matrix(matrix, avg.tasks, run_dir / f"{name}.png", title, -span, span, fmt="+.4f")
