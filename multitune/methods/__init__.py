"""Turn a base model into the model that trains, by method name."""

from __future__ import annotations

import torch

from multitune.config import EXPERT_METHODS, AdapterMethod, FreezeMethod, FullMethod, LoraMethod, TaskConfig


def apply_method(model: torch.nn.Module, cfg, tasks: list[TaskConfig] = ()) -> torch.nn.Module:
    """`tasks` (in run order: task i has id i) matter only to task-gated methods."""
    if isinstance(cfg, LoraMethod):
        from multitune.methods.lora.model import apply_lora

        return apply_lora(model, cfg)
    if cfg.name in EXPERT_METHODS:
        from multitune.methods.experts import apply_experts

        options = cfg.model_dump(exclude={"name"})
        clusters = {t.name: t.cluster for t in tasks if t.cluster is not None}
        return apply_experts(model, cfg.name, [t.name for t in tasks], clusters or None, **options)
    if isinstance(cfg, AdapterMethod):
        from multitune.methods.adapter import apply_adapter

        options = cfg.model_dump(exclude={"name"})
        clusters = {t.name: t.cluster for t in tasks if t.cluster is not None}
        return apply_adapter(model, [t.name for t in tasks], clusters or None, **options)
    from multitune.methods.finetune import apply_freeze, apply_full

    if isinstance(cfg, FullMethod):
        return apply_full(model)
    if isinstance(cfg, FreezeMethod):
        return apply_freeze(model, cfg)
    raise TypeError(f"unknown method config {type(cfg).__name__}")


def saves_adapter(method_name: str) -> bool:
    """True when the run saves a PEFT adapter (loaded onto the base) rather than full weights."""
    return method_name in ("lora", "adapter") or method_name in EXPERT_METHODS


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
