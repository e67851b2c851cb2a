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
- `rank_spread`: whether the processes still hold the same weights (checked at every log step).
- `stop_requested`: a signal to any process stops all of them after the same step.
"""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType

from multitune.config import RunConfig
from multitune.errors import MultituneError
from multitune.methods import task_gated
from multitune.training.sharding import check_shardable


def check_launch(cfg: RunConfig, accelerator) -> None:
    """One line for what the way the run was launched (several processes, FSDP, DeepSpeed)
    cannot run, before anything is written."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise MultituneError("FSDP runs with fsdp_version: 2 in the accelerate config (FSDP1 is not supported)")
        check_shardable(cfg, task_gated(cfg.method))
    if kind == DistributedType.DEEPSPEED:  # examples/accelerate/deepspeed_zero2.yaml
        if accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise MultituneError("DeepSpeed ZeRO-3 shards the weights: use examples/accelerate/fsdp2.yaml")
        check_shardable(cfg, task_gated(cfg.method), "DeepSpeed")
    if accelerator.num_processes > 1:
        if cfg.train.affinity_every:
            raise MultituneError(
                "affinity_every takes its lookahead steps in one process; run it without accelerate launch"
            )
        if cfg.train.domain is not None:  # its classifier would drift apart too
            raise MultituneError(
                "train.domain computes its loss over one process's rows; run it without accelerate launch"
            )


class Processes:
    """The collectives one run on several processes needs, over Accelerate's `accelerator`."""

    def __init__(self, accelerator):
        self.accelerator, self.world = accelerator, accelerator.num_processes

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes (a collective call), back on `t`'s device."""
        return self.accelerator.reduce(t.to(self.accelerator.device), reduction="sum").to(t.device)

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

    def stop_requested(self, mine: str | None) -> str | None:
        """Whether any process was asked to stop (Ctrl-C, SIGTERM), after every step: a signal
        reaches the processes at slightly different times, and a process that went on to the next
        step alone would wait for the others for ever (a collective call)."""
        anyone = float(self.reduce_sum(torch.tensor([1.0 if mine else 0.0]))[0]) > 0
        return mine or ("a stop signal on another process" if anyone else None)

    def rank_spread(self, params: list[torch.Tensor], step: int) -> float:
        """How far apart the processes' trainable weights are (the largest difference of their sum
        and sum of squares, relative to it): DDP keeps them equal, and a run whose processes
        drifted apart is no longer one run, so it stops (a collective call)."""
        acc = self.accelerator
        with torch.no_grad():
            mine = torch.stack([sum(p.double().sum() for p in params), sum(p.double().square().sum() for p in params)])
        every = acc.gather(mine.to(acc.device).unsqueeze(0)).cpu()  # (processes, 2)
        spread = float(((every.max(0).values - every.min(0).values) / every.abs().max(0).values.clamp_min(1e-30)).max())
        if spread > 1e-9:
            raise MultituneError(
                f"the {self.world} processes hold different weights at step {step} "
                f"(relative spread {spread:.3g}): they no longer train one model"
            )
        return spread
