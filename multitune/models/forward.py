"""The one forward pass used by training, evaluation and prediction.

Returns the log-probability of every target token and nothing else. The decoder runs to its
last hidden states; the vocabulary projection and the cross-entropy are then computed only at
the positions that predict a target token, never for prompt or padding. On a 135M model with a
49k vocabulary the LM head is about a fifth of a token's forward FLOPs, and a classification
row has one or two target tokens among a hundred.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from multitune.data.collate import Batch
from multitune.data.encode import IGNORE

# heads that do more than one matmul (soft-capping, scaling): computed by the model itself
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def target_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each target token [N], row index of each target token [N])."""
    logp, rows, _ = _forward(model, batch, None)
    return logp, rows


def target_logprobs_and_pooled(
    model: torch.nn.Module, batch: Batch, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Also the mean hidden state of every row at `layer` (R, H): what domain losses look at."""
    return _forward(model, batch, layer)


def _forward(model: torch.nn.Module, batch: Batch, layer: int | None):
    where = batch.labels[:, 1:] != IGNORE  # a token at position p is predicted at p - 1
    targets = batch.labels[:, 1:][where]
    rows = batch.row_ids[:, 1:][where]
    mask = None if batch.packed else batch.attention_mask
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        out = decoder(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=batch.position_ids,
            use_cache=False,
            output_hidden_states=layer is not None,
        )
        hidden = out.last_hidden_state
        logits = head(hidden[:, :-1][where]).float()  # (N, V)
    else:
        # the model's own forward, its LM head too only where a target is predicted: a boolean
        # (B, T) mask makes transformers' models return those positions' logits, (N, V) in the
        # order of `where`
        out = model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=batch.position_ids,
            logits_to_keep=F.pad(where, (0, 1)),
            use_cache=False,
            output_hidden_states=layer is not None,
        )
        logits = out.logits.float()
    logp = -F.cross_entropy(logits, targets, reduction="none")
    pooled = None if layer is None else _pool_rows(out.hidden_states[layer], batch)
    return logp, rows, pooled


def _pool_rows(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean hidden state of each row's tokens, whatever the layout (padded or packed): (R, H)."""
    real = batch.row_ids >= 0
    ids = batch.row_ids[real]
    sums = torch.zeros(batch.n_rows, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    sums = sums.index_add(0, ids, hidden[real])
    counts = torch.bincount(ids, minlength=batch.n_rows).clamp(min=1).to(hidden.dtype)
    return sums / counts[:, None]


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The decoder stack and the LM head of a (PEFT-wrapped) causal LM, when the head is one
    linear layer; None sends the caller through the model's own forward (DDP and FSDP hook it)."""
    if isinstance(model, DistributedDataParallel | FSDPModule):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if any(getattr(base.config, k, None) not in (None, 1.0) for k in _HEAD_EXTRAS):
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, ValueError, NotImplementedError):
        return None
    if decoder is None or decoder is base or not isinstance(head, torch.nn.Linear):
        return None
    return decoder, head


def per_row_nll(logp: torch.Tensor, rows: torch.Tensor, n_rows: int, reduce: str = "mean") -> torch.Tensor:
    """Negative log-likelihood of each row's target tokens, their mean or their sum: (B,).

    The sum is -log p(target | prompt), what evaluation compares between a task's labels. The
    mean divides it by the target's length, so the token that decides between labels (the first,
    usually) weighs 1/n of a row: a label of 6 tokens ("not_entailment" with its end-of-turn
    token) gets 2/3 of the push that one of 4 tokens ("entailment") gets, and the model leans to
    the shorter label wherever the prompt does not decide (train.row_loss)."""
    total = torch.zeros(n_rows, dtype=logp.dtype, device=logp.device).index_add_(0, rows, -logp)
    if reduce == "sum":
        return total
    count = torch.zeros(n_rows, dtype=logp.dtype, device=logp.device).index_add_(0, rows, torch.ones_like(logp))
    return total / count.clamp(min=1)
