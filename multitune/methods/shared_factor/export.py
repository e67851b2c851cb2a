"""Serving one task of a shared-factor model anywhere: as an ordinary LoRA, or merged into the weights.

Task t's weights and transform are constants, so its update in every layer is a fixed rank-r
LoRA (layer.task_factors): MTL-LoRA's A' = Lambda_t A, B' = sum_i w_t,i B_i.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from multitune.errors import MultituneError
from multitune.methods.shared_factor.config import SharedFactorConfig, gate_row, shared_factor_config
from multitune.methods.shared_factor.layer import SharedFactorLinear
from multitune.methods.task_lora import merged_copy


def _adapter(model: nn.Module) -> tuple[str, SharedFactorConfig]:
    cfg = shared_factor_config(model)
    return next(name for name, c in model.peft_config.items() if c is cfg), cfg


def _layers(model: nn.Module, adapter: str) -> list[tuple[str, SharedFactorLinear]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SharedFactorLinear) and adapter in m.configs]
    if not layers:
        raise MultituneError(f"the model has no shared-factor layers of adapter '{adapter}'")
    return layers


def export_task_lora_info(
    peft_model: nn.Module, task: str, out_dir: str | Path, base_model: str | None = None, max_rank: int | None = None
) -> tuple[Path, dict]:
    """Write `task`'s update as an ordinary PEFT LoRA adapter that `PeftModel.from_pretrained`
    loads without multitune; also returns {"rank", "relative_error"} (see save_plain_lora)."""
    from multitune.methods.lora.export import save_plain_lora

    adapter, cfg = _adapter(peft_model)
    row = gate_row(cfg, task)
    layers = _layers(peft_model.get_base_model(), adapter)
    factors = {name: (*layer.task_factors(adapter, row), layer.scaling[adapter]) for name, layer in layers}
    out = Path(out_dir)
    info = save_plain_lora(
        factors,
        out,
        base_model or cfg.base_model_name_or_path,
        dropout=cfg.dropout,
        fan_in_fan_out=any(layer.is_conv1d for _, layer in layers),
        max_rank=max_rank,
    )
    return out, info


def export_task_lora(peft_model: nn.Module, task: str, out_dir: str | Path) -> Path:
    """`export_task_lora_info` without the info."""
    return export_task_lora_info(peft_model, task, out_dir)[0]


def merge_task(peft_model: nn.Module, task: str) -> PreTrainedModel:
    """A plain transformers model with W0 + delta_t in every targeted layer (a copy: the experts
    model is left as it was)."""
    adapter, cfg = _adapter(peft_model)
    row = gate_row(cfg, task)
    inner = peft_model.get_base_model()
    deltas = {name: layer.task_delta(adapter, row) for name, layer in _layers(inner, adapter)}
    return merged_copy(inner, deltas, lambda model: _layers(model, adapter))


def expert_names(peft_model: nn.Module) -> list[str]:
    """The experts' names, in the column order of `gate_table`."""
    cfg = shared_factor_config(peft_model)
    return [f"{'B' if cfg.share == 'A' else 'A'}{i}" for i in range(cfg.n_experts)]


def gate_table(peft_model: nn.Module) -> dict[str, list[float]]:
    """Each task's weights over the experts, the mean over layers (each layer has its own)."""
    adapter, cfg = _adapter(peft_model)
    with torch.no_grad():
        weights = torch.stack([layer.weights(adapter) for _, layer in _layers(peft_model, adapter)]).mean(0)
    return {t: [float(v) for v in weights[i].cpu()] for i, t in enumerate(cfg.task_names)}
