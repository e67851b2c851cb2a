"""How a training step's rows become tensors: packed sequences (or padded rows), the packed
length that suits the device's attention, and the per-task mean of the row losses."""

from __future__ import annotations

import torch

from multitune.config import RunConfig
from multitune.data.collate import Batch, collate, pack
from multitune.methods import packs_by_task
from multitune.models.attention import skips_other_rows


def layout(rows: list, cfg: RunConfig, pad_id: int, length: int) -> Batch:
    """Packed into sequences of at most `length` tokens (rows of one task per sequence where the
    method's layers read one task per sequence), or one padded row each with `train.packing: false`."""
    if not cfg.train.packing:
        return collate(rows, pad_id)
    return pack(rows, pad_id, length, by_task=packs_by_task(cfg.method))


def pack_length(cfg: RunConfig, model, device: torch.device) -> int:
    """`train.pack_length`, or by default 2048 tokens where attention skips the other rows of a
    packed sequence (a CPU: models/attention.py), `max_length` elsewhere. One sequence of a
    whole step's rows leaves no padding, where sequences of at most 512 tokens left 5% of the
    cells. Longer sequences would only add to the mask, (length x length) floats. Where attention
    computes every row against every other row (CUDA's kernels with a mask), the attention of a
    sequence costs its length squared, so rows stay in `max_length` sequences there."""
    if cfg.train.pack_length is not None:
        return cfg.train.pack_length
    return max(2048, cfg.train.max_length) if skips_other_rows(model, device) else cfg.train.max_length


def task_losses(row_loss: torch.Tensor, row_tasks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each task's mean row loss (K,) and which tasks the batch has (K,) bool."""
    sums = torch.zeros(k, dtype=row_loss.dtype, device=row_loss.device).index_add(0, row_tasks, row_loss)
    counts = torch.bincount(row_tasks, minlength=k)
    return sums / counts.clamp(min=1), counts > 0
