"""Pad encoded rows into a batch.

Padding goes on the left so that every row's target sits at the right edge of the batch: the
vocabulary projection is then computed for the last few positions only (`logits_to_keep`),
which for short classification targets removes most of the LM-head cost, and the same layout
serves batched generation. Position ids are passed explicitly so padding does not shift them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from multitune.data.encode import IGNORE, Encoded


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), left-padded
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE outside targets
    task_ids: torch.Tensor  # (B,)

    def to(self, device: torch.device) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))

    @property
    def target_span(self) -> int:
        """How many positions from the right edge hold a target token (at least 1)."""
        has = (self.labels != IGNORE).any(dim=0).nonzero()
        return int(self.labels.shape[1] - has.min()) if has.numel() else 1


def collate(rows: list[Encoded], pad_id: int) -> Batch:
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, width - n :] = torch.tensor(r.input_ids)
        mask[i, width - n :] = 1
        labels[i, width - n :] = torch.tensor(r.labels)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    task_ids = torch.tensor([r.task_id for r in rows], dtype=torch.long)
    return Batch(ids, mask, positions, labels, task_ids)
