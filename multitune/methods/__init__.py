"""Turn a base model into the model that trains, by method name."""

from __future__ import annotations

import torch

from multitune.config import TaskConfig
from multitune.errors import MultituneError
from multitune.methods.dropout import use_word_dropout
from multitune.methods.registry import method


def apply_method(model: torch.nn.Module, cfg, tasks: list[TaskConfig] = ()) -> torch.nn.Module:
    """`tasks` (in run order: task i has id i) matter only to task-gated methods. Dropout layers
    become `WordDropout` (same distribution, a cheaper mask: see methods/dropout.py)."""
    model = method(cfg.name).apply(model, cfg, list(tasks))
    use_word_dropout(model)
    return model


def task_gated(cfg) -> bool:
    """True when layers read each row's task (task-gated experts, per-task adapters)."""
    return method(cfg.name).reads_task(cfg)


def packs_by_task(cfg) -> bool:
    """True when a packed sequence must hold rows of one task only: the layers read the task per
    sequence. moe_lora / cgc_lora take a task id per token, so their sequences mix tasks as plain
    LoRA's do (less padding: see data/collate.py)."""
    found = method(cfg.name)
    return found.reads_task(cfg) and not found.task_per_token


def saves_adapter(method_name: str) -> bool:
    """True when the run saves a PEFT adapter (loaded onto the base) rather than full weights."""
    return method(method_name).saves_adapter


def param_groups(model: torch.nn.Module, cfg, lr: float) -> list[dict]:
    """Optimizer groups: one, or with LoRA+ (Hayou et al. 2024) the B matrices at lr x ratio, and
    with `gate_lr_ratio` a task-gated method's gate (and task embedding) at lr x that ratio."""
    lora_plus = getattr(cfg, "lora_plus_ratio", None)
    gate = getattr(cfg, "gate_lr_ratio", None)
    # the gate's parameters are named <method>_gate / <method>_task_embedding (PEFT's adapter prefix)
    gate_names = (f"{cfg.name}_gate.", f"{cfg.name}_task_embedding.")
    by_ratio: dict[float, list[torch.nn.Parameter]] = {1.0: []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if gate and any(g in name for g in gate_names):
            ratio = gate
        elif lora_plus and ("lora_B" in name or "lora_embedding_B" in name):
            ratio = lora_plus
        else:
            ratio = 1.0
        by_ratio.setdefault(ratio, []).append(p)
    if gate and not by_ratio.get(gate):
        raise MultituneError(f"gate_lr_ratio: {cfg.name} has no parameter named {' or '.join(gate_names)}")
    return [{"params": params, "lr": lr * ratio} for ratio, params in by_ratio.items() if params or ratio == 1.0]


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
