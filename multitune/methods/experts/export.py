"""Serving one task of a task-gated model anywhere: as an ordinary LoRA, or merged into the weights.

For task t only the experts in its gate matter and its gate is a constant, so its update in
every layer is a fixed low-rank matrix: A_t = the rows of A of those experts, B_t = their columns
of B times the gate weights. That is a plain LoRA of rank (common + specific ranks of t) that
vanilla PEFT, vLLM and other multi-LoRA servers load, or a weight delta to add to W0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from multitune.errors import MultituneError
from multitune.files import atomic_path
from multitune.methods.experts.config import ExpertsConfig, experts_config, gate_row
from multitune.methods.experts.layer import ExpertsLinear
from multitune.methods.experts.model import _StoreScales
from multitune.methods.task_lora import merged_copy


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _adapter(model: nn.Module) -> tuple[str, ExpertsConfig]:
    cfg = experts_config(model)
    for name, c in model.peft_config.items():
        if c is cfg:
            return name, cfg
    raise MultituneError("could not find the adapter name of the experts config")  # unreachable in practice


def _layers(model: nn.Module, adapter: str) -> list[tuple[str, ExpertsLinear]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertsLinear) and adapter in m.routers]
    if not layers:
        raise MultituneError(f"the model has no task-gated layers of adapter '{adapter}'")
    return layers


def export_task_lora(peft_model: nn.Module, task: str, out_dir: str | Path) -> Path:
    """Write `task`'s update as an ordinary PEFT LoRA adapter (adapter_config.json +
    adapter_model.safetensors) that `PeftModel.from_pretrained` loads without multitune."""
    return export_task_lora_info(peft_model, task, out_dir)[0]


def export_task_lora_info(
    peft_model: nn.Module, task: str, out_dir: str | Path, base_model: str | None = None, max_rank: int | None = None
) -> tuple[Path, dict]:
    """`export_task_lora`, also returning {"rank", "relative_error"} (`max_rank`: see
    multitune.methods.lora.export.save_plain_lora); `base_model` names the base in the adapter."""
    from multitune.methods.lora.export import save_plain_lora

    adapter, cfg = _adapter(peft_model)
    row = gate_row(cfg, task)
    layers = _layers(_inner_model(peft_model), adapter)
    factors = {name: (*layer.task_factors(adapter, row), layer.scaling[adapter]) for name, layer in layers}
    out = Path(out_dir)
    info = save_plain_lora(
        factors,
        out,
        base_model or cfg.base_model_name_or_path,
        dropout=cfg.dropout,
        fan_in_fan_out=any(layer.is_conv1d for _, layer in layers),  # GPT-2's Conv1D stores W as (in, out)
        max_rank=max_rank,
    )
    return out, info


def merge_task(peft_model: nn.Module, task: str) -> PreTrainedModel:
    """A plain transformers model with W0 + delta_t in every targeted layer (a copy: the experts
    model is left as it was and stays usable)."""
    adapter, cfg = _adapter(peft_model)
    row = gate_row(cfg, task)
    inner = _inner_model(peft_model)
    deltas = {name: layer.task_delta(adapter, row) for name, layer in _layers(inner, adapter)}
    merged = merged_copy(inner, deltas, lambda model: _layers(model, adapter))
    for key in [k for k, h in merged._forward_pre_hooks.items() if isinstance(h, _StoreScales)]:
        del merged._forward_pre_hooks[key]  # the copy is a plain model: no gate scales to compute
    return merged


def expert_names(peft_model: nn.Module) -> list[str]:
    """The experts' names, in the column order of `gate_table`."""
    return list(experts_config(peft_model).layout().expert_names)


def gate_table(peft_model: nn.Module) -> dict[str, list[float]]:
    """Each task's gate weights over all experts (0 outside its gate). With gate="per_layer": the
    mean over layers."""
    adapter, cfg = _adapter(peft_model)
    layers = _layers(_inner_model(peft_model), adapter)
    router = layers[0][1].routers[adapter]
    with torch.no_grad():
        if router.proj is not None:
            gates = router.gates()
        else:
            gates = torch.stack([layer.routers[adapter].gates(layer.own_gate(adapter)) for _, layer in layers]).mean(0)
    return {t: [float(v) for v in gates[i].cpu()] for i, t in enumerate(cfg.task_names)}


def plot_gates(table: dict[str, list[float]], path_png: str | Path, expert_names: Sequence[str] | None = None) -> Path:
    """A heatmap of `gate_table(...)`: tasks down, experts across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(table)
    values = torch.tensor([table[t] for t in tasks]).numpy()
    names = list(expert_names) if expert_names is not None else [f"e{i}" for i in range(values.shape[1])]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 1.0 + 0.45 * len(tasks)))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=max(1e-9, float(values.max())), aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(names)):
            if values[i, j] > 0:
                dark = values[i, j] < 0.6 * values.max()
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
    ax.set_title("task gates")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    out = Path(path_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out
