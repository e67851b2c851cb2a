"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) as a PEFT method, optionally one per task or cluster.

Importing this package registers ``adapter`` with PEFT.

    model = apply_adapter(base, ["sst2", "rte"], style="pfeiffer", reduction_factor=16)
    loss = model(**batch).loss          # per_task="task" / "cluster": inside task_context(task_ids)
"""

from multitune.methods.adapter.config import ADAPTER, MERGE_ERROR, PLACES, AdapterConfig
from multitune.methods.adapter.layer import BottleneckLayer, StackedLinear
from multitune.methods.adapter.model import AdapterModel, apply_adapter, find_places, hidden_size

__all__ = [
    "ADAPTER",
    "MERGE_ERROR",
    "PLACES",
    "AdapterConfig",
    "AdapterModel",
    "BottleneckLayer",
    "StackedLinear",
    "apply_adapter",
    "find_places",
    "hidden_size",
]
