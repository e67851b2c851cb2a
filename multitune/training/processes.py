"""Several processes, one run: what makes a step on N processes the step one process takes on the
whole global batch, beyond DDP's averaging of gradients.

DDP averages each process's gradient. For the mean row loss (`rows`) that is already the global
mean, as every process holds batch_size rows. A balancer or a gradient-surgery method reads
each task's loss or gradient, and a task's rows are spread unevenly over the processes, so those
are made global here:

- `task_losses`: each task's loss over the rows of all processes as its value, with a local
  gradient scaled by N * n_k / N_k (n_k this process's rows of task k, N_k all processes'), so
  that DDP's average of the gradients of any function f of the task losses is the gradient of f
  at the global losses: sum_k f'(L_k) * (1 / N_k) sum over all rows of task k. Every process
  holds the same values, so the balancers' state moves alike on all of them.
- `task_grads`: the per-task gradients of those losses averaged over the processes: each task's
  gradient over the global batch, the same on every process, which then combines them alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class Processes:
    """The collectives one run on `world` processes needs (`reduce_sum`: a tensor summed over them)."""

    def __init__(self, world: int, reduce_sum: Callable[[torch.Tensor], torch.Tensor]):
        self.world, self.reduce_sum = world, reduce_sum

    def task_losses(self, task_loss: torch.Tensor, row_tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each task's global loss with the scaled local gradient, which tasks any process has)."""
        counts = torch.bincount(row_tasks, minlength=task_loss.shape[0]).to(task_loss.device, torch.float64)
        both = self.reduce_sum(torch.stack([counts, counts * task_loss.detach().double()]))
        total, weighted = both[0], both[1]
        present = total > 0
        value = torch.where(present, weighted / total.clamp(min=1), 0).to(task_loss.dtype)
        scale = torch.where(present, self.world * counts / total.clamp(min=1), 0).to(task_loss.dtype)
        return value + scale * (task_loss - task_loss.detach()), present

    def task_grads(self, grads: torch.Tensor) -> torch.Tensor:
        """(K, P) per-task gradients of `task_losses`' losses, averaged over the processes."""
        return self.reduce_sum(grads) / self.world
