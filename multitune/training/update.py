"""How a training step turns per-task losses into gradients: one `StepUpdate` per `train.balance`
family, so the loop has no branch on the loss mode.

- `LossUpdate`: the mean row loss (`rows`) or a balancer's combination of the task losses
  (training/loss_weighting.py), plus the domain term of `train.domain`; one backward.
- `SurgeryUpdate`: per-task gradients combined by a gradient-surgery method
  (training/surgery.py) and added to `.grad` directly.

Both add L2-SP (`train.l2sp`) once per optimizer step. Adding a balancing method: a balancer in
loss_weighting.py or a direction function in surgery.py, and its name in config.py's tuples; the
update classes do not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from multitune.config import RunConfig
from multitune.domain.domain_loss import DomainTerm
from multitune.training.l2sp import L2SP
from multitune.training.loss_weighting import make_balancer
from multitune.training.surgery import SURGERY, add_grad, cagrad, pcgrad, surgery_direction


@dataclass
class MicroBatch:
    """One micro-batch's losses, as every update reads them."""

    row_loss: torch.Tensor  # (rows,) each row's target NLL (train.row_loss: mean or sum)
    task_loss: torch.Tensor  # (K,) each task's mean row loss
    present: torch.Tensor  # (K,) bool: tasks with rows in this micro-batch
    row_tasks: torch.Tensor  # (rows,) task id of each row
    pooled: torch.Tensor | None  # (rows, hidden) for the domain term
    grads: list[torch.Tensor] | None  # per-task gradients of the present tasks (surgery, probes)


class StepUpdate(ABC):
    """The per-step interface the loop calls: backward per micro-batch, then around the optimizer."""

    needs_task_grads = False

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, steps: int):
        self.cfg, self.steps = cfg, steps
        self.k = len(cfg.tasks)
        self.l2sp = L2SP(model.named_parameters(), alpha=cfg.train.l2sp) if cfg.train.l2sp else None
        self.domain = DomainTerm(cfg, model.config.hidden_size) if cfg.train.domain is not None else None

    @property
    def pooled_layer(self) -> int | None:
        """The layer whose pooled hidden states the domain term reads (None: no domain term)."""
        return self.cfg.train.domain.layer if self.domain is not None else None

    def to(self, device: torch.device) -> StepUpdate:
        for module in self.modules().values():
            module.to(device)
        return self

    def modules(self) -> dict[str, torch.nn.Module]:
        """The update's own trainable state, saved in checkpoints beside the model."""
        if self.domain is not None and self.domain.classifier is not None:
            return {"domain_classifier": self.domain.classifier}
        return {}

    def param_groups(self, lr: float) -> list[dict]:
        if self.domain is not None and self.domain.classifier is not None:
            # an adversary slower than the encoder is no adversary
            return [{"params": list(self.domain.classifier.parameters()), "lr": lr * self.cfg.train.domain.lr_ratio}]
        return []

    @abstractmethod
    def backward(self, mb: MicroBatch, step: int, backward) -> None:
        """Gradients of one micro-batch into `.grad` (`backward` is the accelerator's)."""

    def before_optimizer(self, backward) -> None:
        if self.l2sp is not None:  # once per optimizer step: pulls the weights back to the pre-trained ones
            backward(self.l2sp.penalty())

    def after_optimizer(self, step_loss: torch.Tensor, step_seen: torch.Tensor) -> None:  # noqa: B027
        """After `optimizer.step()`, with the step's mean loss per task; default: nothing learns here."""

    def figures(self) -> tuple[dict, dict[str, dict]]:
        """(figures of the whole step, per-task figures) since the last log line."""
        return (self.domain.flush() if self.domain is not None else {}), {}


class LossUpdate(StepUpdate):
    """`rows` (mean row loss) or a balancer's weighted task losses, plus the domain term."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, steps: int, balancer=None):
        super().__init__(cfg, model, steps)
        self.balancer = balancer

    def modules(self) -> dict[str, torch.nn.Module]:
        return {**({"balancer": self.balancer} if self.balancer is not None else {}), **super().modules()}

    def param_groups(self, lr: float) -> list[dict]:
        groups = []
        if self.balancer is not None and list(self.balancer.parameters()):  # uncertainty: log-variances
            groups.append({"params": list(self.balancer.parameters()), "lr": lr, "weight_decay": 0.0})
        return groups + super().param_groups(lr)

    def backward(self, mb: MicroBatch, step: int, backward) -> None:
        if self.balancer is not None:
            loss = self.balancer.combine(mb.task_loss, mb.present) / self.k
        else:
            loss = mb.row_loss.mean()
        if self.domain is not None:
            loss = loss + self.domain.loss(mb.pooled, mb.row_tasks, step / self.steps)
        backward(loss / self.cfg.train.grad_accum)

    def after_optimizer(self, step_loss: torch.Tensor, step_seen: torch.Tensor) -> None:
        if self.balancer is not None:
            self.balancer.update(step_loss / step_seen.clamp(min=1), step_seen > 0)

    def figures(self) -> tuple[dict, dict[str, dict]]:
        record, per_task = super().figures()
        if self.balancer is not None:
            per_task = {t: {"weight": w} for t, w in self.balancer.weights().items()}
        return record, per_task


class SurgeryUpdate(StepUpdate):
    """Per-task gradients combined into one direction (PCGrad, CAGrad, Aligned-MTL, MGDA,
    IMTL-G), on the sum scale, written into `.grad`."""

    needs_task_grads = True

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, steps: int, direction, params: list):
        super().__init__(cfg, model, steps)
        self.direction, self.params = direction, params

    def backward(self, mb: MicroBatch, step: int, backward) -> None:
        combined = surgery_direction(self.direction, mb.grads, step)
        add_grad(self.params, combined, 1 / (self.k * self.cfg.train.grad_accum))


def make_update(cfg: RunConfig, model: torch.nn.Module, steps: int, params: list) -> StepUpdate:
    """The update `train.balance` names."""
    b = cfg.train.balance
    if b.method == "rows":
        return LossUpdate(cfg, model, steps)
    if b.method == "pcgrad":  # its random task order is drawn from (seed, step): a resumed run repeats it
        seed = cfg.train.seed
        return SurgeryUpdate(
            cfg, model, steps, lambda g, step: pcgrad(g, torch.Generator().manual_seed(seed * 7919 + step)), params
        )
    if b.method == "cagrad":
        return SurgeryUpdate(cfg, model, steps, lambda g, step: cagrad(g, c=b.cagrad_c), params)
    if b.method in SURGERY:  # no options, no state
        return SurgeryUpdate(cfg, model, steps, lambda g, step: SURGERY[b.method](g), params)
    options = {
        "static": {"weights": b.weights},
        "dwa": {"temperature": b.temperature, "beta": b.beta},
        "famo": {"w_lr": b.famo_lr, "gamma": b.famo_decay},
    }.get(b.method, {})
    return LossUpdate(cfg, model, steps, make_balancer(b.method, cfg.task_names, **options))
