"""The domain term of a training step (`train.domain`), as the loop adds it to the task loss."""

from __future__ import annotations

import torch

from multitune.config import RunConfig
from multitune.domain.invariance import ALIGNMENT, DomainClassifier, dann_lambda, dann_loss


class DomainTerm:
    """The domain loss of `train.domain` for one micro-batch, from the rows' pooled hidden states:
    DANN's domain classifier behind a gradient-reversal layer (lambda warmed up over training), or
    CORAL / MMD between the target domain's rows and the others'. Rows of tasks without `domain:`
    take no part. Keeps the window's mean loss (and DANN's accuracy) for the log."""

    def __init__(self, cfg: RunConfig, hidden_size: int):
        self.cfg = cfg.train.domain
        self.names = list(dict.fromkeys(t.domain for t in cfg.tasks if t.domain is not None))
        self.of_task = torch.tensor([self.names.index(t.domain) if t.domain else -1 for t in cfg.tasks])
        self.target = self.names.index(self.cfg.target) if self.cfg.target else len(self.names) - 1
        dann = self.cfg.method == "dann"
        self.classifier = DomainClassifier(hidden_size, len(self.names), self.cfg.width) if dann else None
        self.sums = {"domain_loss": 0.0, "domain_accuracy": 0.0}
        self.count = 0

    def loss(self, pooled: torch.Tensor, row_tasks: torch.Tensor, progress: float) -> torch.Tensor:
        domains = self.of_task.to(row_tasks.device)[row_tasks]
        keep = domains >= 0
        pooled, domains = pooled[keep], domains[keep]
        if self.classifier is not None:
            if not len(domains):
                return pooled.sum() * 0.0
            lam = dann_lambda(progress, self.cfg.gamma, self.cfg.max_lambda)
            value, accuracy = dann_loss(self.classifier, pooled, domains, lam)
            self.sums["domain_accuracy"] += accuracy
        else:
            is_target = domains == self.target
            value = ALIGNMENT[self.cfg.method](pooled[~is_target], pooled[is_target])
        self.sums["domain_loss"] += float(value)
        self.count += 1
        return self.cfg.weight * value

    def flush(self) -> dict:
        keys = ["domain_loss", "domain_accuracy"] if self.classifier is not None else ["domain_loss"]
        out = {k: self.sums[k] / self.count for k in keys} if self.count else {}
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.count = 0
        return out
