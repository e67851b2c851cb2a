"""Task-gated mixture of LoRA experts (MOELoRA, CGC-LoRA) as PEFT methods.

Importing this package registers ``moe_lora`` and ``cgc_lora`` with PEFT.

    model = apply_experts(base, "cgc_lora", ["sst2", "rte"], {"sst2": "nli"}, rank=16)
    with task_context(task_ids(model, batch_task_names)):
        loss = model(**batch).loss
        loss.backward()
"""

from multitune.methods.experts.config import (
    CgcLoraConfig,
    ExpertLayout,
    ExpertsConfig,
    MoeLoraConfig,
    split_rank,
    task_id,
)
from multitune.methods.experts.export import (
    expert_names,
    export_task_lora,
    export_task_lora_info,
    gate_table,
    merge_task,
    plot_gates,
)
from multitune.methods.experts.layer import CgcLoraLinear, ExpertsLinear, MoeLoraLinear
from multitune.methods.experts.model import CgcLoraModel, ExpertsModel, MoeLoraModel, apply_experts, task_ids
from multitune.methods.task_context import task_context

__all__ = [
    "CgcLoraConfig",
    "CgcLoraLinear",
    "CgcLoraModel",
    "ExpertLayout",
    "ExpertsConfig",
    "ExpertsLinear",
    "ExpertsModel",
    "MoeLoraConfig",
    "MoeLoraLinear",
    "MoeLoraModel",
    "apply_experts",
    "expert_names",
    "export_task_lora",
    "export_task_lora_info",
    "gate_table",
    "merge_task",
    "plot_gates",
    "split_rank",
    "task_context",
    "task_id",
    "task_ids",
]
