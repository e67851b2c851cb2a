"""Turn a base model into the model that trains, by method name."""

from __future__ import annotations

import torch

from multitune.config import TaskConfig
from multitune.methods.dropout import use_word_dropout
from multitune.methods.registry import method


def apply_method(model: torch.nn.Module, cfg, tasks: list[TaskConfig] = ()) -> torch.nn.Module:
    """`tasks` (in run order: task i has id i) matter only to task-gated methods. Dropout layers
    become `WordDropout` (same distribution, a cheaper mask: see methods/dropout.py)."""
    model = method(cfg.name).apply(model, cfg, list(tasks))
    use_word_dropout(model)
    return model


def task_gated(cfg) -> bool:
    """True when layers read each row's task (task-gated experts, per-task adapters): then a
    packed sequence must hold rows of one task only."""
    return method(cfg.name).reads_task(cfg)


def saves_adapter(method_name: str) -> bool:
    """True when the run saves a PEFT adapter (loaded onto the base) rather than full weights."""
    return method(method_name).saves_adapter


def param_groups(model: torch.nn.Module, cfg, lr: float) -> list[dict]:
    """Optimizer groups: one, or with LoRA+ (Hayou et al. 2024) the B matrices at lr x ratio."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = getattr(cfg, "lora_plus_ratio", None)
    if not ratio:
        return [{"params": [p for _, p in params], "lr": lr}]
    b = [p for n, p in params if "lora_B" in n or "lora_embedding_B" in n]
    rest = [p for n, p in params if not ("lora_B" in n or "lora_embedding_B" in n)]
    return [{"params": rest, "lr": lr}, {"params": b, "lr": lr * ratio}]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting tied weights once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
