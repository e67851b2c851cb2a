"""How different are the tasks' weight updates? Why the task-gated experts end level with one LoRA.

A task-gated model (moe_lora, cgc_lora, lora_experts, mtl_lora) gives every task its own
effective update delta W_t = sum of its experts' updates weighted by its gate. If training makes
those updates differ, the experts separate the tasks; if they stay nearly equal, the model is in
effect one LoRA shared by all tasks, and cannot do better than one. Single-task LoRAs trained
apart are the reference for how different the tasks' updates are when nothing is shared.

For each run given, this prints every task's ||delta W_t||_F over all adapted layers, the
pairwise cosines of the tasks' updates (each update flattened over all layers) and the shared
share ||mean_t delta W_t||^2 / mean_t ||delta W_t||^2 (1.0: all tasks' updates equal; 1/K:
orthogonal updates of equal norm). For lora_experts / mtl_lora, whose every layer has its own
gate, also the spread of those gates: the range of the weights, the span max - min of each
layer's task logits (AdamW at lr 5e-4 moves a logit by at most about 0.25 in 500 steps), and the
coupling w_s . w_t of two tasks' weights (all equal: every task mixes the B_i alike). No forward
pass, no data: the trained weights only.

    python bench/task_updates.py STUDY/cgc-count STUDY/lora-experts-A       # one gated run each
    python bench/task_updates.py --apart STUDY/single-r16/{sst2,ag_news,rte,medical_abstracts}
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch

from multitune import rundir
from multitune.config import RunConfig
from multitune.errors import MultituneError
from multitune.models.load import load_trained_model


def _per_task_layers(model) -> Iterator[tuple[str, object]]:
    """(name, layer) of every layer that gives each task its own update."""
    from multitune.methods.experts import ExpertsLinear
    from multitune.methods.shared_factor.layer import SharedFactorLinear

    for name, module in model.named_modules():
        if isinstance(module, ExpertsLinear | SharedFactorLinear):
            yield name, module


def load_run(run_dir: Path) -> tuple[RunConfig, torch.nn.Module]:
    """A run's config and trained model, loaded once for every measure of it."""
    cfg = rundir.load_run_config(run_dir)
    return cfg, load_trained_model(run_dir, cfg)[0]


def gate_spread(cfg: RunConfig, model: torch.nn.Module) -> dict | None:
    """Per-layer gates of a shared-factor run (lora_experts, mtl_lora): weight range, logit span
    (mean and max over layers and tasks) and the range of w_s . w_t over task pairs s != t."""
    from multitune.methods.shared_factor.layer import SharedFactorLinear

    k = len(cfg.task_names)
    weights, spans = [], []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SharedFactorLinear):
                weights.append(module.weights("default")[:k].float())  # the tasks' rows, not the fallback's
                z = module._part("gate")["default"].float() / module.configs["default"].temperature
                spans.append(z.max(-1).values - z.min(-1).values)
    if not weights:
        return None
    w, span = torch.stack(weights), torch.stack(spans)  # (L, K, n), (L, K)
    coupling = w @ w.transpose(1, 2)
    off = coupling[:, ~torch.eye(k, dtype=torch.bool)]
    return {
        "weights": [float(w.min()), float(w.max())],
        "logit_span": [float(span.mean()), float(span.max())],
        "coupling": [float(off.min()), float(off.max())],
    }


def gated_deltas(cfg: RunConfig, model: torch.nn.Module) -> tuple[list[str], Iterator[tuple[str, list[torch.Tensor]]]]:
    """The tasks of a task-gated run and, layer by layer, each task's update delta W_t."""
    from multitune.methods.registry import method

    entry = method(cfg.method.name)
    if not entry.per_task:
        raise MultituneError(f"{cfg.output}: {cfg.method.name} gives every task the same update; use --apart")
    rows = entry.task_ids(model, cfg.task_names, None)

    def layers() -> Iterator[tuple[str, list[torch.Tensor]]]:
        for name, layer in _per_task_layers(model):
            yield name, [layer.task_delta("default", rows[t]).float() for t in cfg.task_names]

    return cfg.task_names, layers()


def apart_deltas(run_dirs: list[Path]) -> tuple[list[str], Iterator[tuple[str, list[torch.Tensor]]]]:
    """One plain LoRA run per task (trained apart): each run's task and, layer by layer, its update."""
    tasks, models = [], []
    for run_dir in run_dirs:
        cfg = rundir.load_run_config(run_dir)
        if cfg.method.name != "lora" or len(cfg.task_names) != 1:
            raise MultituneError(f"{run_dir}: --apart takes single-task plain LoRA runs")
        tasks.append(cfg.task_names[0])
        models.append(load_trained_model(run_dir, cfg)[0])

    def lora_layers(model) -> dict[str, object]:
        return {n: m for n, m in model.named_modules() if hasattr(m, "get_delta_weight") and "default" in m.lora_A}

    by_run = [lora_layers(m) for m in models]

    def layers() -> Iterator[tuple[str, list[torch.Tensor]]]:
        for name in by_run[0]:
            yield name, [r[name].get_delta_weight("default").float() for r in by_run]

    return tasks, layers()


def geometry(layers: Iterator[tuple[str, list[torch.Tensor]]], k: int) -> dict:
    """Norms, cosines and shared share of K tasks' updates from their layers, accumulated as the
    Gram matrix of the flattened updates (never holding all layers at once)."""
    gram = torch.zeros(k, k, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for _, deltas in layers:
            flat = torch.stack([d.reshape(-1) for d in deltas]).double()
            gram += flat @ flat.T
            count += 1
    if not count:
        raise MultituneError("no adapted layer found")
    norms = gram.diagonal().sqrt()
    cos = gram / norms.outer(norms)
    shared = float(gram.sum() / k**2 / gram.diagonal().mean())  # ||mean_t d_t||^2 / mean_t ||d_t||^2
    return {"norms": norms.tolist(), "cosines": cos.tolist(), "shared": shared, "layers": count}


def print_geometry(label: str, tasks: list[str], g: dict) -> None:
    scale = f"1.0: equal updates, {1 / len(tasks):.2f}: orthogonal"
    print(f"\n{label}: {g['layers']} layers, shared share {g['shared']:.3f} ({scale})")
    print("| ||delta W_t||_F / cosine | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for i, t in enumerate(tasks):
        cells = " | ".join(f"{g['cosines'][i][j]:.3f}" for j in range(len(tasks)))
        print(f"| {t} ({g['norms'][i]:.3f}) | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--apart", action="store_true", help="the runs are single-task LoRAs, one per task")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.apart:
            tasks, layers = apart_deltas(args.runs)
            print_geometry("single-task LoRAs trained apart", tasks, geometry(layers, len(tasks)))
            return
        for run in args.runs:
            cfg, model = load_run(run)
            tasks, layers = gated_deltas(cfg, model)
            print_geometry(str(run), tasks, geometry(layers, len(tasks)))
            spread = gate_spread(cfg, model)
            if spread:
                print(
                    "per-layer gates: weights {:.3f} - {:.3f}; logit span (of z / temperature) mean {:.3f}, "
                    "max {:.3f}; coupling w_s . w_t {:.3f} - {:.3f}".format(
                        *spread["weights"], *spread["logit_span"], *spread["coupling"]
                    )
                )
    except MultituneError as e:
        raise SystemExit(f"task_updates: {e}") from None


if __name__ == "__main__":
    main()
