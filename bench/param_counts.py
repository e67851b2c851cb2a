"""Trainable vs total parameters of each method on the bundled model (the README's table).

python bench/param_counts.py
"""

from __future__ import annotations

import contextlib
import io
import warnings

from multitune.config import validate_config
from multitune.methods import apply_method, count_parameters
from multitune.models.base import load_base_model

warnings.filterwarnings("ignore", category=FutureWarning)

TASKS = [
    {"name": n, "kind": "text", "data": {"train": "unused"}} for n in ("sst2", "ag_news", "rte", "medical_abstracts")
]
METHODS = [
    ("lora, rank 8, all-linear", {"name": "lora", "rank": 8}),
    ("lora, rank 16, all-linear", {"name": "lora", "rank": 16}),
    ("lora, rank 16, attention", {"name": "lora", "rank": 16, "targets": "attention"}),
    ("lora, rank 16, mlp", {"name": "lora", "rank": 16, "targets": "mlp"}),
    ("dora, rank 16, all-linear", {"name": "lora", "rank": 16, "dora": True}),
    ("moe_lora, rank 12, 4 experts (4 tasks)", {"name": "moe_lora", "rank": 12, "experts": 4}),
    ("cgc_lora, rank 12, 2 common + 1 per task (4 tasks)", {"name": "cgc_lora", "rank": 12}),
    ("lora_experts, share A, rank 16, 4 experts (4 tasks)", {"name": "lora_experts", "rank": 16, "experts": 4}),
    ("lora_experts, share B, rank 16, 4 experts (4 tasks)", {"name": "lora_experts", "share": "B", "rank": 16}),
    ("mtl_lora, rank 8, 3 up-projections (4 tasks)", {"name": "mtl_lora", "rank": 8, "up_projections": 3}),
    ("adapter, pfeiffer, reduction 16", {"name": "adapter", "style": "pfeiffer"}),
    ("adapter, houlsby, reduction 16", {"name": "adapter", "style": "houlsby"}),
    ("adapter, pfeiffer, one per task (4 tasks)", {"name": "adapter", "style": "pfeiffer", "per_task": "task"}),
    ("freeze, last 2 layers", {"name": "freeze", "last_layers": 2}),
    ("full", {"name": "full"}),
]


def main() -> None:
    print("| method | trainable | total | share |")
    print("|---|---:|---:|---:|")
    for label, method in METHODS:
        cfg = validate_config({"tasks": TASKS, "method": method})
        with contextlib.redirect_stdout(io.StringIO()):  # the expert layouts print their rank split
            model = apply_method(load_base_model("smollm2-135m-instruct"), cfg.method, cfg.tasks)
        trainable, total = count_parameters(model)
        print(f"| {label} | {trainable:,} | {total:,} | {100 * trainable / total:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
