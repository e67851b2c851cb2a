"""Multi-task LoRA vs MoE-LoRA vs CGC-LoRA vs one LoRA per task, at one parameter budget.

Trains, on the bundled SmolLM2-135M-Instruct and four classification tasks of the full data sets (`--data DIR`):
- `lora`, `moe_lora` and `cgc_lora` on the uniform mixture of the four tasks (`--steps` steps);
- one `lora` per task (`--steps / 4` steps each: the same number of rows of that task as the
  multi-task runs see).
All use the same rank budget (A and B parameters of one LoRA of rank `--rank`) and the same
batch size, learning rate and schedule. It prints per-task dev accuracy, the mean, Δm (mean
relative change against the single-task baselines, in %) and how many tasks fell below their
baseline, and writes the table to `<out>/comparison.md`.

    python bench/compare_methods.py --data DIR      # the README's table (about 30 minutes on 2 CPU cores)
    python bench/compare_methods.py --data DIR --steps 8 --eval 16 --out /tmp/cmp   # a quick look
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from multitune.config import validate_config
from multitune.files import write_atomic
from multitune.training.loop import train

TASKS = [
    {
        "name": "sst2",
        "prompt": "Review: {{ text }}\nIs the sentiment of this review positive or negative?",
        "labels": ["negative", "positive"],
    },
    {
        "name": "ag_news",
        "prompt": "Article: {{ text }}\nIs this article about World, Sports, Business or Sci/Tech?",
        "labels": ["Business", "Sci/Tech", "Sports", "World"],
    },
    {
        "name": "rte",
        "prompt": "Premise: {{ premise }}\nHypothesis: {{ hypothesis }}\n"
        "Does the premise entail the hypothesis? Answer entailment or not_entailment.",
        "labels": ["entailment", "not_entailment"],
    },
    {
        "name": "medical_abstracts",
        "prompt": "Abstract: {{ text }}\nWhich kind of disease is this abstract about: cardiovascular diseases, "
        "digestive system diseases, general pathological conditions, neoplasms or nervous system diseases?",
        "labels": [
            "cardiovascular diseases",
            "digestive system diseases",
            "general pathological conditions",
            "neoplasms",
            "nervous system diseases",
        ],
    },
]


def task_spec(t: dict, n_eval: int, data: str) -> dict:
    return {
        "name": t["name"],
        "kind": "classification",
        "data": {
            "train": str(Path(data) / t["name"] / "train.jsonl"),
            "dev": str(Path(data) / t["name"] / "dev.jsonl"),
        },
        "prompt": t["prompt"],
        "target": "{{ label }}",
        "labels": t["labels"],
        "max_eval_examples": n_eval,
    }


def run(name: str, method: dict, tasks: list[dict], steps: int, args) -> dict:
    raw = {
        "model": "smollm2-135m-instruct",
        "method": {**method, "alpha": 2 * args.rank, "dropout": 0.05, "targets": "all-linear"},
        "tasks": tasks,
        "mixing": {"strategy": "uniform"},
        "train": {
            "max_steps": steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "max_length": args.max_length,
            "log_every": 10,
            "seed": 0,
        },
        "eval": {"zero_shot": False, "batch_size": 16},
        "output": str(Path(args.out) / name),
    }
    print(f"=== {name}: {method['name']} on {', '.join(t['name'] for t in tasks)}, {steps} steps", flush=True)
    return train(validate_config(raw), overwrite=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of the full data sets (one sub-folder per task)")
    p.add_argument("--steps", type=int, default=48, help="multi-task steps (single-task runs get steps / 4)")
    p.add_argument("--rank", type=int, default=12, help="rank budget (12 splits evenly into 4 and 6 experts)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval", type=int, default=100, help="dev rows per task")
    p.add_argument("--out", default="runs/compare")
    args = p.parse_args()

    tasks = [task_spec(t, args.eval, args.data) for t in TASKS]
    names = [t["name"] for t in tasks]
    rows: dict[str, dict] = {}
    params: dict[str, int] = {}
    for label, method in [
        ("lora (multi-task)", {"name": "lora", "rank": args.rank}),
        ("moe_lora, 4 experts", {"name": "moe_lora", "rank": args.rank, "experts": 4}),
        (
            "cgc_lora, 2 common + 1 per task",
            {"name": "cgc_lora", "rank": args.rank, "common_experts": 2, "task_experts": 1},
        ),
    ]:
        res = run(method["name"] + "-multitask", method, tasks, args.steps, args)
        rows[label] = {t: res["fine_tuned"]["tasks"][t]["accuracy"] for t in names}
        params[label] = res["train"]["trainable_parameters"]
    single = {}
    for t in tasks:
        res = run(f"lora-{t['name']}", {"name": "lora", "rank": args.rank}, [t], max(1, args.steps // len(tasks)), args)
        single[t["name"]] = res["fine_tuned"]["tasks"][t["name"]]["accuracy"]
        params["lora (one per task)"] = res["train"]["trainable_parameters"]
    rows = {"lora (one per task)": single, **rows}

    head = "| method | trainable params | " + " | ".join(names) + " | mean | Δm vs single-task | tasks below single |"
    lines = [head, "|---|---:|" + "---:|" * len(names) + "---:|---:|---:|"]
    for label, acc in rows.items():
        mean = sum(acc.values()) / len(acc)
        if label == "lora (one per task)":
            delta, below = "0.0 (baseline)", "-"
        else:
            delta = f"{100 * sum((acc[t] - single[t]) / single[t] for t in names) / len(names):+.1f}%"
            below = str(sum(acc[t] < single[t] for t in names))
        cells = " | ".join(f"{acc[t]:.1f}" for t in names)
        lines.append(f"| {label} | {params[label]:,} | {cells} | {mean:.1f} | {delta} | {below} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(args.out) / "comparison.md", table + "\n")
    write_atomic(Path(args.out) / "comparison.json", json.dumps({"accuracy": rows, "params": params}, indent=2))


if __name__ == "__main__":
    main()
