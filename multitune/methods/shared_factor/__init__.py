"""Shared-factor task experts (HydraLoRA-style lora_experts, MTL-LoRA) as PEFT methods.

Importing this package registers ``lora_experts`` and ``mtl_lora`` with PEFT.

    model = apply_shared_factor(base, "mtl_lora", ["sst2", "rte"], rank=8, up_projections=3)
    with task_context(task_ids(model, batch_task_names)):
        loss = model(**batch).loss
"""

from multitune.methods.shared_factor.config import (
    LoraExpertsConfig,
    MtlLoraConfig,
    SharedFactorConfig,
    gate_row,
    shared_factor_config,
    task_id,
)
from multitune.methods.shared_factor.export import (
    expert_names,
    export_task_lora,
    export_task_lora_info,
    gate_table,
    merge_task,
)
from multitune.methods.shared_factor.layer import LoraExpertsLinear, MtlLoraLinear, SharedFactorLinear
from multitune.methods.shared_factor.model import (
    LoraExpertsModel,
    MtlLoraModel,
    SharedFactorModel,
    apply_shared_factor,
    task_ids,
)

__all__ = [
    "LoraExpertsConfig",
    "LoraExpertsLinear",
    "LoraExpertsModel",
    "MtlLoraConfig",
    "MtlLoraLinear",
    "MtlLoraModel",
    "SharedFactorConfig",
    "SharedFactorLinear",
    "SharedFactorModel",
    "apply_shared_factor",
    "expert_names",
    "export_task_lora",
    "export_task_lora_info",
    "gate_row",
    "gate_table",
    "merge_task",
    "shared_factor_config",
    "task_id",
    "task_ids",
]
