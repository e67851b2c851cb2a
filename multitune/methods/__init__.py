"""Turn a base model into the model that trains, by method name."""

from __future__ import annotations

import torch

from multitune.config import FreezeMethod, FullMethod, LoraMethod


def apply_method(model: torch.nn.Module, cfg) -> torch.nn.Module:
    if isinstance(cfg, LoraMethod):
        from multitune.methods.lora.model import apply_lora

        return apply_lora(model, cfg)
    from multitune.methods.finetune import apply_freeze, apply_full

    if isinstance(cfg, FullMethod):
        return apply_full(model)
    if isinstance(cfg, FreezeMethod):
        return apply_freeze(model, cfg)
    raise TypeError(f"unknown method config {type(cfg).__name__}")


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
