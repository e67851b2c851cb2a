"""How fast does each task's update grow under a gate? The first hypothesis of the quality study.

A task-gated expert's output is scaled by (alpha / r) * g_t[e] with g a softmax over the k
experts task t sees: at uniform gates each expert moves the output k times less than the same
rank slots of a plain LoRA of the same alpha / r, and a task sees only its experts' slots. AdamW
moves each weight by about lr whatever its gradient's scale, so the effective update of a task,
delta W_t, should grow several times slower than plain LoRA's at the same learning rate.

This trains each variant for `--steps` steps on the study's four tasks (bench/quality/study.yaml,
same rows, seed and learning rate) and prints, per task, ||delta W_t||_F over all adapted layers
(sqrt of the sum of the layers' squared norms) and its ratio to plain LoRA's ||delta W||, and the
mean training loss of the last `--tail` steps.

    python bench/gate_scale.py --data ../shared/data --steps 20 --out /tmp/gate-scale
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from multitune import rundir
from multitune.config import load_config
from multitune.methods.experts import ExpertsLinear
from multitune.methods.experts.config import gate_row
from multitune.models.load import load_trained_model
from multitune.training.loop import train

STUDY = Path(__file__).resolve().parent / "quality" / "study.yaml"
VARIANTS = {
    "lora": ["method.name=lora"],
    "cgc_lora softmax": ["method.name=cgc_lora", "method.gate_norm=softmax"],
    "cgc_lora count": ["method.name=cgc_lora", "method.gate_norm=count"],
    "moe_lora softmax": ["method.name=moe_lora", "method.gate_norm=softmax"],
    "moe_lora count": ["method.name=moe_lora", "method.gate_norm=count"],
}


def task_update_norms(run_dir: Path) -> dict[str, float]:
    """||delta W_t||_F of every task over all adapted layers (one shared value for plain LoRA)."""
    cfg = rundir.load_run_config(run_dir)
    model, _ = load_trained_model(run_dir, cfg)
    squares = dict.fromkeys(cfg.task_names, 0.0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ExpertsLinear):
                for task in cfg.task_names:
                    squares[task] += float(module.task_delta("default", gate_row(model, task)).norm() ** 2)
            elif hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                value = float(module.get_delta_weight("default").norm() ** 2)
                for task in cfg.task_names:
                    squares[task] += value
    return {t: math.sqrt(v) for t, v in squares.items()}


def tail_losses(run_dir: Path, tail: int) -> dict[str, float]:
    """Mean training loss of each task over the log lines of the last `tail` steps."""
    records = [json.loads(line) for line in (run_dir / rundir.METRICS).read_text().splitlines()]
    last = max(r["step"] for r in records)
    out: dict[str, list[float]] = {}
    for r in records:
        if r["split"] == "train" and "task" in r and r["step"] > last - tail:
            out.setdefault(r["task"], []).append(r["loss"])
    return {t: sum(v) / len(v) for t, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder of the data sets (../shared/data)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tail", type=int, default=10, help="steps whose training loss is averaged")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", required=True, help="folder for the runs (one sub-folder per variant)")
    args = parser.parse_args()
    if "lora" not in args.variants:
        parser.error("--variants must include lora: the ratios are to it")

    base = load_config(STUDY)
    splits = ("train", "dev")
    data = [f"tasks.{t}.data.{s}={Path(args.data) / t / f'{s}.jsonl'}" for t in base.task_names for s in splits]
    common = [*data, f"train.max_steps={args.steps}", f"train.lr={args.lr}", "train.log_every=1"]
    if args.threads:
        common.append(f"train.threads={args.threads}")
    norms, losses = {}, {}
    for name in args.variants:
        out = Path(args.out) / name.replace(" ", "-")
        cfg = load_config(STUDY, [*common, *VARIANTS[name], f"output={out}"])
        if not (out / rundir.MODEL).is_dir():
            train(cfg, overwrite=True, final_eval=False)
        norms[name], losses[name] = task_update_norms(out), tail_losses(out, args.tail)
    tasks = base.task_names
    print(f"\n||delta W_t||_F after {args.steps} steps at lr {args.lr:g} (ratio to plain LoRA)")
    print("| variant | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks))
    for name in args.variants:
        cells = [f"{norms[name][t]:.3f} ({norms[name][t] / norms['lora'][t]:.2f}x)" for t in tasks]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\ntraining loss, mean of the last {args.tail} steps")
    print("| variant | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks))
    for name in args.variants:
        print(f"| {name} | " + " | ".join(f"{losses[name].get(t, float('nan')):.3f}" for t in tasks) + " |")


if __name__ == "__main__":
    main()
