"""Forgetting of general ability: perplexity on a general-text reference set, before and during
fine-tuning. A domain fine-tune that lowers the task loss while this perplexity climbs is trading
general language ability for the domain; the run reports the change so the trade is visible."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from multitune.config import RunConfig
from multitune.data.encode import Encoder
from multitune.data.sources import Example, load_split, read_rows
from multitune.errors import MultituneError
from multitune.evaluation.evaluator import text_nll
from multitune.methods.task_context import task_context


def retention_examples(cfg: RunConfig) -> list[Example]:
    """The reference texts of `cfg.retention`, as unlabelled examples of the run's first task
    (the task only decides which gate a task-gated model uses: the first task's)."""
    r = cfg.retention
    first = cfg.tasks[0].name
    if r.task is not None:
        rows = load_split(cfg.task(r.task), "dev", r.max_examples)
        if not rows:
            raise MultituneError(f"retention.task '{r.task}' has no dev split to take general text from")
        return [Example(first, ex.prompt, None, where=ex.where) for ex in rows]
    out = []
    for line, row in read_rows(r.data)[: r.max_examples]:
        value = row.get(r.field)
        if not isinstance(value, str) or not value.strip():
            raise MultituneError(f"{r.data}:{line}: field '{r.field}' is missing or not a non-empty string")
        out.append(Example(first, value, None, where=f"{Path(r.data).name}:{line}"))
    if not out:
        raise MultituneError(f"{r.data}: no rows (retention needs general text)")
    return out


@torch.no_grad()
def retention_perplexity(model: torch.nn.Module, encoder: Encoder, examples: list[Example], batch_size: int) -> float:
    was_training = model.training
    model.eval()
    try:
        with task_context(torch.tensor([encoder.task_ids[examples[0].task]])):
            preds = text_nll(model, encoder, examples, batch_size)
    finally:
        model.train(was_training)
    tokens = sum(p["tokens"] for p in preds)
    return math.exp(sum(p["nll"] for p in preds) / max(tokens, 1))


def retention_change(before: float, after: float) -> dict:
    return {"before": before, "after": after, "change_pct": 100 * (after - before) / before}
