"""One table of fine-tuning methods: what each is, as the rest of multitune asks it.

Every question the loop, the evaluator, `export`, `gates` and model loading ask of a method (does
it save a PEFT adapter? do its layers read each row's task? how do task names map to the ids its
layers read? how does it export a plain LoRA or merge?) is answered by its `Method` entry, never
by a branch on its name elsewhere. Adding a method: a folder under methods/ with its PEFT tuner
(config, layer, model), a config class in config.py's `MethodConfig`, and one entry here. The
functions import their package when called, so reading this table loads no model library.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from multitune.errors import MultituneError


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[..., nn.Module]  # (model, method config, tasks in run order) -> the model that trains
    saves_adapter: bool  # the run saves a PEFT adapter on the base (else full weights)
    merges: bool = False  # the update folds into the weights: `merged` export, a later stage's base
    per_task: bool = False  # one update per task: export and merge need a task
    gated: bool = False  # has a gate per task (`multitune gates`, which calls `gates`)
    reads_task: Callable[[Any], bool] = lambda cfg: False  # layers read each row's task
    task_per_token: bool = False  # those layers also take one task id per token: packing may mix tasks
    task_ids: Callable[..., dict[str, int] | None] = lambda model, names, fallback: None
    export_lora: Callable[..., dict] | None = None  # (model, cfg, task, out, base, max_rank) -> info
    merge: Callable[..., nn.Module] | None = None  # (model, task) -> plain transformers model
    no_lora: str = ""  # why `--format peft-lora` cannot export it
    gates: Callable[..., tuple[list[str], dict[str, list[float]]]] | None = None  # model -> (experts, task -> weights)


# --- lora ---------------------------------------------------------------------------------


def _apply_lora(model, cfg, tasks):
    from multitune.methods.lora.model import apply_lora

    return apply_lora(model, cfg)


def _export_lora(model, cfg, task, out: Path, base: Path, max_rank):
    from multitune.methods.lora.export import lora_factors, save_plain_lora

    fan_in_fan_out = bool(model.peft_config["default"].fan_in_fan_out)
    return save_plain_lora(lora_factors(model), out, base, cfg.method.dropout, fan_in_fan_out, max_rank)


# --- task-gated experts ---------------------------------------------------------------------


def _apply_experts(model, cfg, tasks):
    from multitune.methods.experts import apply_experts
    from multitune.methods.targets import resolve_targets

    names, clusters = _names_and_clusters(tasks)
    options = cfg.model_dump(exclude={"name", "gate_lr_ratio"})  # an optimizer setting
    options["targets"] = resolve_targets(model, cfg.targets)
    return apply_experts(model, cfg.name, names, clusters, **options)


# --- shared-factor experts (lora_experts, mtl_lora) ----------------------------------------------


def _apply_shared_factor(model, cfg, tasks):
    from multitune.methods.shared_factor import apply_shared_factor
    from multitune.methods.targets import resolve_targets

    options = cfg.model_dump(exclude={"name", "gate_lr_ratio"})  # an optimizer setting
    options["targets"] = resolve_targets(model, cfg.targets)
    return apply_shared_factor(model, cfg.name, [t.name for t in tasks], **options)


def _per_task(package: str, apply: Callable[..., nn.Module]) -> dict:
    """The entry of a per-task LoRA family: `package` (methods.experts, methods.shared_factor)
    exports task_id, export_task_lora_info, merge_task, expert_names and gate_table alike."""

    def load():
        return importlib.import_module(package)

    return {
        "apply": apply,
        "saves_adapter": True,
        "merges": True,
        "per_task": True,
        "gated": True,
        "reads_task": lambda cfg: True,
        "task_ids": lambda model, names, fallback: {n: load().task_id(model, n, fallback) for n in names},
        "export_lora": lambda model, cfg, task, out, base, max_rank: load().export_task_lora_info(
            model, task, out, base, max_rank
        )[1],
        "merge": lambda model, task: load().merge_task(model, task),
        "gates": lambda model: (load().expert_names(model), load().gate_table(model)),
    }


# --- bottleneck adapters --------------------------------------------------------------------


def _apply_adapter(model, cfg, tasks):
    from multitune.methods.adapter import apply_adapter

    names, clusters = _names_and_clusters(tasks)
    return apply_adapter(model, names, clusters, **cfg.model_dump(exclude={"name"}))


def _adapter_task_ids(model, names, fallback):
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is None or peft_config.per_task == "none":
        return None
    known = list(peft_config.task_names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MultituneError(f"unknown task '{unknown[0]}'; the model knows: {', '.join(known)}")
    return {n: known.index(n) for n in names}


# --- full and partial fine-tuning -----------------------------------------------------------


def _apply_full(model, cfg, tasks):
    from multitune.methods.full_and_freeze import apply_full

    return apply_full(model)


def _apply_freeze(model, cfg, tasks):
    from multitune.methods.full_and_freeze import apply_freeze

    return apply_freeze(model, cfg)


def _full_weights(name: str) -> str:
    return f"a '{name}' run has no adapter to export: use --format merged"


def _names_and_clusters(tasks) -> tuple[list[str], dict[str, str] | None]:
    return [t.name for t in tasks], ({t.name: t.cluster for t in tasks if t.cluster is not None} or None)


_GATED = {**_per_task("multitune.methods.experts", _apply_experts), "task_per_token": True}
_SHARED_FACTOR = _per_task("multitune.methods.shared_factor", _apply_shared_factor)
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "lora",
            _apply_lora,
            saves_adapter=True,
            merges=True,
            export_lora=_export_lora,
            merge=lambda model, task: model.merge_and_unload(),
        ),
        Method("moe_lora", **_GATED),
        Method("cgc_lora", **_GATED),
        Method("lora_experts", **_SHARED_FACTOR),
        Method("mtl_lora", **_SHARED_FACTOR),
        Method(
            "adapter",
            _apply_adapter,
            saves_adapter=True,
            reads_task=lambda cfg: cfg.per_task != "none",
            task_ids=_adapter_task_ids,
            no_lora="an adapter run has no LoRA to export",
        ),
        *(
            Method(name, apply, saves_adapter=False, merges=True, merge=lambda m, t: m, no_lora=_full_weights(name))
            for name, apply in (("full", _apply_full), ("freeze", _apply_freeze))
        ),
    )
}
GATED = tuple(name for name, m in METHODS.items() if m.gated)


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise MultituneError(f"unknown method '{name}'; known: {', '.join(METHODS)}") from None
