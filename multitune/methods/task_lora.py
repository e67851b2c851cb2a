"""What the two families of per-task LoRA methods share (methods/experts: moe_lora, cgc_lora;
methods/shared_factor: lora_experts, mtl_lora): finding a model's active config, checking the
options a method is applied with, and one task's update as a weight delta or a merged copy."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from multitune.errors import MultituneError


def active_config(model_or_config: Any, cls: type, what: str) -> Any:
    """The (active) config of type `cls` of a PeftModel, a tuner, a tuned model, or the config
    itself; `what` names the methods in the error."""
    if isinstance(model_or_config, cls):
        return model_or_config
    configs = getattr(model_or_config, "peft_config", None)
    if isinstance(configs, dict):
        active = getattr(model_or_config, "active_adapter", None)
        names = [active] if isinstance(active, str) else list(active or [])
        for name in [*names, *configs]:
            if isinstance(configs.get(name), cls):
                return configs[name]
    raise MultituneError(f"{type(model_or_config).__name__} has no {what} adapter")


def config_kwargs(method: str, options: dict[str, Any], common: set[str], only: dict[str, set[str]]) -> dict:
    """A method's options as config keyword arguments (None: the default; `targets` ->
    `target_modules`); an option of another method, or of none, is one line saying so."""
    known = common | only[method]
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key not in known:
            other = next((m for m, keys in only.items() if key in keys), None)
            hint = f" (it is {other}'s)" if other else f"; known: {', '.join(sorted(known))}"
            raise MultituneError(f"method {method} has no option '{key}'{hint}")
        kwargs["target_modules" if key == "targets" else key] = value
    return kwargs


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, is_conv1d: bool) -> torch.Tensor:
    """scaling * B A, shaped like the base weight (GPT-2's Conv1D stores it as (in, out))."""
    delta = (b @ a) * scaling
    return delta.T if is_conv1d else delta


def merged_copy(
    inner: nn.Module, deltas: dict[str, torch.Tensor], layers: Callable[[nn.Module], Iterable[tuple[str, nn.Module]]]
) -> nn.Module:
    """A copy of `inner` with each of its adapter `layers` replaced by its base layer plus the
    delta of the same name: a plain transformers model (the original is left as it was)."""
    merged = copy.deepcopy(inner)
    for name, layer in list(layers(merged)):
        base = layer.get_base_layer()
        with torch.no_grad():
            base.weight += deltas[name].to(base.weight.device, base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name) if parent_name else merged, child, base)
    if "peft_config" in merged.__dict__:
        del merged.peft_config
    merged.requires_grad_(True)  # as a freshly loaded model
    return merged
