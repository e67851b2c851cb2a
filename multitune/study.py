"""Commands that answer "do these tasks belong together?": `affinity` (a short measuring run) and
`compare` (single-task baselines against the multi-task run). Both call the ordinary training
loop, so what they measure is what `multitune train` does."""

from __future__ import annotations

import json
from pathlib import Path

from multitune import run as rundir
from multitune.config import RunConfig, load_config
from multitune.data.mixing import mixture_probabilities
from multitune.errors import MultituneError
from multitune.evaluate.interference import compare_table, propose_clusters
from multitune.lock import RunLock
from multitune.tasks.spec import higher_is_better, primary_metric
from multitune.train.loop import train


def affinity_run(
    config: str | Path,
    overrides: list[str] | None = None,
    steps: int = 40,
    every: int = 1,
    clusters: int = 2,
    lookahead_lr: float | None = None,
    output: str | None = None,
    overwrite: bool = False,
) -> str:
    """Train `steps` steps measuring TAG lookahead affinity every `every` steps; return the
    averaged matrix and a proposed grouping into `clusters` clusters, as text."""
    cfg = load_config(config, overrides)
    cfg.train.max_steps = steps
    cfg.train.affinity_every = every
    cfg.train.affinity_lr = lookahead_lr or cfg.train.affinity_lr
    cfg.train.eval_every = None
    cfg.train.early_stopping = None
    cfg.eval.zero_shot = False
    cfg.output = output or f"{cfg.output}-affinity"
    if clusters > len(cfg.tasks):
        raise MultituneError(f"--clusters {clusters} is more than the {len(cfg.tasks)} tasks of {config}")
    results = train(cfg, overwrite=overwrite, final_eval=False)
    names, matrix = results["affinity"]["tasks"], results["affinity"]["matrix"]
    never = [f"{names[i]}>{names[j]}" for i, row in enumerate(matrix) for j, v in enumerate(row) if v is None]
    z = {a: {b: matrix[i][j] or 0.0 for j, b in enumerate(names)} for i, a in enumerate(names)}
    groups = propose_clusters(z, clusters)
    lines = [f"lookahead affinity, mean of {results['affinity']['measurements']} steps (row's step helps column):"]
    lines.append("| from \\ to | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for i, a in enumerate(names):
        lines.append(f"| {a} | " + " | ".join("-" if v is None else f"{v:+.4f}" for v in matrix[i]) + " |")
    if never:
        lines.append(f"never measured together (counted as 0): {', '.join(never)}")
    lines.append(f"proposed {clusters} clusters (paste into the tasks of the config for cgc_lora):")
    lines += [f"  - name: {t}\n    cluster: {c}" for t, c in groups.items()]
    lines.append(f"heatmap: {Path(cfg.output) / 'affinity.png'}")
    text = "\n".join(lines)
    rundir.write_atomic(Path(cfg.output) / "affinity.md", text + "\n")
    return text


def compare_run(
    config: str | Path,
    overrides: list[str] | None = None,
    singles: str | None = None,
    reuse: bool = False,
    overwrite: bool = False,
    resume: bool = False,
) -> str:
    """Train one single-task run per task (same method, budget and settings; each sees as many
    rows of its task as the multi-task run does) and the multi-task run, then compare them: per-task
    deltas, Δm, tasks below their baseline, the worst task. Returns the markdown table.

    `singles`: where the single-task runs live (default `<output>-single`), so several multi-task
    variants (balancing methods, mixtures) can share one set of baselines; `reuse`: read finished
    runs (results.json with fine-tuned metrics) instead of training them again; `resume`: reuse
    finished runs and continue interrupted ones from their last checkpoint (a study that takes
    hours survives being stopped)."""
    cfg = load_config(config, overrides)
    singles_dir = Path(singles or f"{cfg.output}-single")
    sizes = {t: len(rows) for t, rows in rundir.load_examples(cfg, "train").items()}
    missing = [t.name for t in cfg.tasks if t.name not in sizes]
    if missing:
        raise MultituneError(f"compare needs a train split for every task; missing for {', '.join(missing)}")
    share = mixture_probabilities(sizes, cfg.mixing.strategy, cfg.mixing.temperature, cfg.mixing.weights)
    single_scores = {}
    for task in cfg.tasks:
        single = _single_task_config(cfg, task.name, share[task.name], rundir.child(singles_dir, task.name))
        single_scores[task.name] = _fine_tuned(single, reuse, overwrite, resume)[task.name]
    multi_scores = _fine_tuned(cfg, reuse, overwrite, resume)
    metric = {t.name: primary_metric(t) for t in cfg.tasks}
    table = compare_table(
        {t: multi_scores[t][metric[t]] for t in metric},
        {t: single_scores[t][metric[t]] for t in metric},
        {t: higher_is_better(metric[t]) for t in metric},
    )
    lines = ["| task | metric | single-task | multi-task | Δ | Δ % |", "|---|---|---|---|---|---|"]
    for t, row in table["tasks"].items():
        lines.append(
            f"| {t} | {metric[t]} | {row['single']:.2f} | {row['multi']:.2f} | {row['delta']:+.2f} | "
            f"{row['relative_delta']:+.1f}% |"
        )
    lines.append(
        f"\nΔm {table['delta_m']:+.2f}% ({cfg.train.balance.method} balance); "
        f"{table['below_baseline']} of {len(metric)} tasks below their single-task baseline; "
        f"worst: {table['worst_task']} ({table['tasks'][table['worst_task']]['relative_delta']:+.1f}%)"
    )
    text = "\n".join(lines)
    with RunLock(cfg.output):
        rundir.write_atomic(Path(cfg.output) / "compare.json", json.dumps({"metric": metric, **table}, indent=1) + "\n")
        rundir.write_atomic(Path(cfg.output) / "compare.md", text + "\n")
    return text


def _single_task_config(cfg: RunConfig, task: str, share: float, output: Path) -> RunConfig:
    single = cfg.model_copy(deep=True)
    single.tasks = [t for t in single.tasks if t.name == task]
    single.mixing.strategy, single.mixing.weights = "proportional", None
    single.train.balance = type(cfg.train.balance)()
    single.train.interference_every = single.train.affinity_every = None
    if cfg.train.max_steps is not None:  # as many rows of this task as the multi-task run draws
        single.train.max_steps = max(1, round(cfg.train.max_steps * share))
    es = single.train.early_stopping
    if es is not None and es.metric != "mean" and es.metric.split("/")[0] != task:
        es.metric = "mean"
    single.output = str(output)
    return single


def _fine_tuned(cfg: RunConfig, reuse: bool, overwrite: bool, resume: bool = False) -> dict[str, dict]:
    run_dir = Path(cfg.output)
    if (reuse or resume) and (run_dir / rundir.RESULTS).is_file():
        done = rundir.read_results(run_dir).get("fine_tuned")
        if done:
            print(f"[compare] reusing {run_dir}")
            return done["tasks"]
    started = resume and (run_dir / rundir.CONFIG).is_file()
    what = "continuing" if started else "training"
    print(f"[compare] {what} {run_dir} ({', '.join(cfg.task_names)}, {cfg.train.max_steps or 'epochs'} steps)")
    return train(cfg, overwrite=overwrite, resume=started)["fine_tuned"]["tasks"]
