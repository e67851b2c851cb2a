"""The one forward pass used by training, evaluation and prediction.

Returns the log-probability of every target token and nothing else: logits are computed only
for the right-most positions that hold targets (see `collate`), never for prompt or padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from multitune.data.collate import Batch
from multitune.data.encode import IGNORE


def target_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each target token [N], row index of each target token [N])."""
    # a token at position p is predicted by the logits at p - 1
    keep = min(batch.target_span + 1, batch.input_ids.shape[1])
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = out.logits[:, :-1].float()  # (B, keep - 1, V): predictions for the last keep-1 tokens
    labels = batch.labels[:, -(keep - 1) :]
    where = labels != IGNORE
    picked = logits[where]  # (N, V)
    logp = -F.cross_entropy(picked, labels[where], reduction="none")
    rows = where.nonzero()[:, 0]
    return logp, rows


def per_row_mean_nll(logp: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean negative log-likelihood of each row's target tokens: (B,)."""
    total = torch.zeros(n_rows, dtype=logp.dtype, device=logp.device).index_add_(0, rows, -logp)
    count = torch.zeros(n_rows, dtype=logp.dtype, device=logp.device).index_add_(0, rows, torch.ones_like(logp))
    return total / count.clamp(min=1)
