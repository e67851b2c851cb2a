"""Commands that answer "do these tasks belong together?": `affinity` (a short measuring run) and
`compare` (single-task baselines against the multi-task run). Both call the ordinary training
loop, so what they measure is what `multitune train` does."""

from __future__ import annotations

import json
from pathlib import Path

from multitune import rundir
from multitune.analysis.affinity import propose_clusters
from multitune.analysis.bootstrap import mean_std, paired_bootstrap, seed_mean_rows
from multitune.analysis.delta_m import compare_table
from multitune.config import RunConfig, as_config
from multitune.data.mixing import mixture_probabilities
from multitune.errors import MultituneError
from multitune.files import write_atomic
from multitune.lock import RunLock
from multitune.tasks.metric_info import higher_is_better, primary_metric
from multitune.training.loop import train


def affinity_run(
    config: str | Path | dict | RunConfig,
    overrides: list[str] | None = None,
    steps: int = 40,
    every: int = 1,
    clusters: int = 2,
    lookahead_lr: float | None = None,
    output: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Train `steps` steps measuring TAG lookahead affinity every `every` steps; return the
    averaged matrix and a proposed grouping into `clusters` clusters: {"tasks", "matrix",
    "measurements", "clusters" (task -> cluster), "text" (also in OUTPUT/affinity.md)}."""
    cfg = as_config(config, overrides)
    cfg.train.max_steps = steps
    cfg.train.affinity_every = every
    cfg.train.affinity_lr = lookahead_lr or cfg.train.affinity_lr
    cfg.train.eval_every = None
    cfg.train.early_stopping = None
    cfg.eval.zero_shot = False
    cfg.output = output or f"{cfg.output}-affinity"
    if clusters > len(cfg.tasks):
        where = config if isinstance(config, str | Path) else "the config"
        raise MultituneError(f"--clusters {clusters} is more than the {len(cfg.tasks)} tasks of {where}")
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
    write_atomic(Path(cfg.output) / rundir.AFFINITY_MD, text + "\n")
    measured = results["affinity"]["measurements"]
    return {"tasks": names, "matrix": matrix, "measurements": measured, "clusters": groups, "text": text}


def compare_run(
    config: str | Path | dict | RunConfig,
    overrides: list[str] | None = None,
    singles: str | None = None,
    reuse: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    seeds: list[int] | None = None,
    merge: str | None = None,
    merge_weight: float | None = None,
    merge_density: float | None = None,
) -> dict:
    """Train one single-task run per task (same method, budget and settings; each sees as many
    rows of its task as the multi-task run does) and the multi-task run, then compare them: per-task
    deltas, Δm, tasks below their baseline, the worst task, and a 95% paired-bootstrap interval
    over the dev rows for each delta and for Δm (multitune/analysis/bootstrap.py). Returns
    compare.json's content with the markdown table as "text" (both also written to OUTPUT/).

    `singles`: where the single-task runs live (default `<output>-single`), so several multi-task
    variants (balancing methods, mixtures) can share one set of baselines; `reuse`: read finished
    runs (results.json with fine-tuned metrics) instead of training them again (a reused run
    trained with other settings than this comparison asks, e.g. baselines at another learning
    rate, is named with them in the output, in compare.md and in compare.json's
    "reused_with_other_settings"); `resume`: reuse
    finished runs and continue interrupted ones from their last checkpoint (a study that takes
    hours survives being stopped). `seeds`: train every run once per seed, in
    `<output>/seed-<s>` and `<singles>/<task>/seed-<s>`; the table shows mean ± std over seeds and
    the interval of the seed-averaged per-row scores. `merge`: also merge each seed's single-task
    LoRAs with this method (multitune/merging.py) into `<output>-merged-<method>` and compare that
    model with the same baselines ("merged" in compare.json, a second table in the text);
    `merge_weight`: every run's weight in it (default 1: cat is then the sum of the updates, 1 /
    the number of tasks their mean), `merge_density`: ties / dare / magnitude_prune's (0.5); the
    folder name then ends in -w<weight> / -d<density>."""
    cfg = as_config(config, overrides)
    if merge is None and (merge_weight is not None or merge_density is not None):
        raise MultituneError("--merge-weight and --merge-density go with --merge METHOD")
    merged_name = f"{cfg.output}-merged-{merge}"
    if merge is not None:
        from multitune.merging import check_options

        weights = None if merge_weight is None else [merge_weight] * len(cfg.tasks)
        merge_density = check_options(merge, len(cfg.tasks), weights, merge_density, None)[1]
        if cfg.method.name != "lora":
            raise MultituneError(f"--merge combines single-task LoRA runs; this run's method is {cfg.method.name}")
        merged_name += (f"-w{merge_weight:g}" if merge_weight is not None else "") + (
            f"-d{merge_density:g}" if merge_density is not None and merge_density != 0.5 else ""
        )
    singles_dir = Path(singles or f"{cfg.output}-single")
    sizes = {t: len(rows) for t, rows in rundir.load_examples(cfg, "train").items()}
    missing = [t.name for t in cfg.tasks if t.name not in sizes]
    if missing:
        raise MultituneError(f"compare needs a train split for every task; missing for {', '.join(missing)}")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise MultituneError(f"--seeds repeats a seed: {seeds}")
    if seeds is not None and not all(0 <= s < 2**32 for s in seeds):
        raise MultituneError(f"--seeds must be integers from 0 to 2**32 - 1: {seeds}")
    share = mixture_probabilities(sizes, cfg.mixing.strategy, cfg.mixing.temperature, cfg.mixing.weights)
    single_runs: dict[str, list[dict]] = {t: [] for t in cfg.task_names}
    multi_runs: list[dict] = []
    merged_runs: list[dict] = []
    reused: dict[str, dict] = {}  # reused runs trained with other settings than this comparison's
    n_seeds = len(seeds or [cfg.train.seed])
    count = {"done": 0, "total": n_seeds * (len(cfg.tasks) + 1 + (merge is not None))}  # for "[compare] k/N"
    for seed in seeds or [cfg.train.seed]:
        seed_singles = []
        for task in cfg.tasks:
            out = _seed_dir(rundir.child(singles_dir, task.name), seed, seeds)
            single = _single_task_config(cfg, task.name, share[task.name], out)
            single.train.seed = seed
            single_runs[task.name].append(_fine_tuned(single, reuse, overwrite, resume, count, reused))
            seed_singles.append(out)
        multi = cfg.model_copy(deep=True)
        multi.train.seed, multi.output = seed, str(_seed_dir(Path(cfg.output), seed, seeds))
        multi_runs.append(_fine_tuned(multi, reuse, overwrite, resume, count, reused))
        if merge is not None:
            merged_dir = _seed_dir(Path(merged_name), seed, seeds)
            how = {"method": merge, "weights": weights, "density": merge_density}
            merged_runs.append(_merged(seed_singles, merged_dir, how, reuse, overwrite, resume, count))
    metric = {t.name: primary_metric(t) for t in cfg.tasks}
    higher = {t: higher_is_better(m) for t, m in metric.items()}
    summary = compare_seeds(multi_runs, single_runs, metric, higher)
    summary["seeds"] = seeds or [cfg.train.seed]
    summary["singles"] = str(singles_dir)
    text = _compare_text(summary, metric, f"{cfg.train.balance.method} balance")
    if reused:
        summary["reused_with_other_settings"] = reused
        text += "\n\nReused runs trained with other settings than this comparison's (saved -> asked):\n" + "\n".join(
            f"- {run}: {rundir.describe_changes(changes, limit=8)}" for run, changes in reused.items()
        )
    if merge is not None:
        summary["merged"] = compare_seeds(merged_runs, single_runs, metric, higher)
        options = {"weight": 1.0 if merge_weight is None else merge_weight, "density": merge_density}
        summary["merged"].update(seeds=summary["seeds"], method=merge, output=merged_name, **options)
        merged_text = _compare_text(summary["merged"], metric, f"{merge} merge", "merged LoRAs")
        text += f"\n\nMerged single-task LoRAs ({merge}, {merged_name}):\n\n{merged_text}"
    with RunLock(cfg.output):
        write_atomic(Path(cfg.output) / rundir.COMPARE_JSON, json.dumps(summary, indent=1) + "\n")
        write_atomic(Path(cfg.output) / rundir.COMPARE_MD, text + "\n")
    if merge is not None:  # the merge's own comparison beside it, so that several merges keep theirs
        with RunLock(merged_name):
            write_atomic(Path(merged_name) / rundir.COMPARE_JSON, json.dumps(summary["merged"], indent=1) + "\n")
            write_atomic(Path(merged_name) / rundir.COMPARE_MD, merged_text + "\n")
    return {**summary, "text": text}


def _seed_dir(path: Path, seed: int, seeds: list[int] | None) -> Path:
    return path if seeds is None else rundir.child(path, f"seed-{seed}")


def compare_seeds(
    multi_runs: list[dict], single_runs: dict[str, list[dict]], metric: dict[str, str], higher: dict[str, bool]
) -> dict:
    """Multi-task against single-task runs, one of each per seed (`fine_tuned` results): the
    per-seed tables, mean ± std of each task's metric and of Δm, and the paired-bootstrap
    intervals of the seed-averaged per-row scores (when every run kept its rows)."""
    tasks = list(metric)
    per_seed = [
        compare_table(
            {t: multi["tasks"][t][metric[t]] for t in tasks},
            {t: single_runs[t][i]["tasks"][t][metric[t]] for t in tasks},
            higher,
        )
        for i, multi in enumerate(multi_runs)
    ]
    out: dict = {"metric": metric, "tasks": {}, "per_seed": per_seed}
    for t in tasks:
        multi_mean, multi_std = mean_std([r["tasks"][t][metric[t]] for r in multi_runs])
        single_mean, single_std = mean_std([r["tasks"][t][metric[t]] for r in single_runs[t]])
        out["tasks"][t] = {
            "single": single_mean,
            "single_std": single_std,
            "multi": multi_mean,
            "multi_std": multi_std,
            "delta": multi_mean - single_mean,
            "relative_delta": mean_std([p["tasks"][t]["relative_delta"] for p in per_seed])[0],
        }
    out["delta_m"], out["delta_m_std"] = mean_std([p["delta_m"] for p in per_seed])
    out["below_baseline"] = sum(1 for row in out["tasks"].values() if row["relative_delta"] < 0)
    out["worst_task"] = min(tasks, key=lambda t: out["tasks"][t]["relative_delta"])
    kept = all("rows" in r and t in r["rows"] for t in tasks for r in [*multi_runs, *single_runs[t]])
    if kept:
        a = {t: seed_mean_rows([r["rows"][t] for r in multi_runs]) for t in tasks}
        b = {t: seed_mean_rows([r["rows"][t] for r in single_runs[t]]) for t in tasks}
        boot = paired_bootstrap(a, b, higher)
        for t in tasks:
            out["tasks"][t]["interval"] = boot["tasks"][t]["delta"]
            out["tasks"][t]["relative_interval"] = boot["tasks"][t]["relative_delta"]
            out["tasks"][t]["p_better"] = boot["tasks"][t]["p_better"]
        out["delta_m_interval"], out["p_better"] = boot["delta_m"], boot["p_better"]
    return out


def _compare_text(summary: dict, metric: dict[str, str], how: str, label: str = "multi-task") -> str:
    n = len(summary["seeds"])

    def value(mean: float, std: float) -> str:
        return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"

    lines = [
        f"| task | metric | single-task | {label} | Δ | Δ % | 95% interval of Δ (dev rows) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, row in summary["tasks"].items():
        interval = "[{:+.2f}, {:+.2f}]".format(*row["interval"]) if "interval" in row else "-"
        single, multi = value(row["single"], row["single_std"]), value(row["multi"], row["multi_std"])
        delta = f"{row['delta']:+.2f} | {row['relative_delta']:+.1f}%"
        lines.append(f"| {t} | {metric[t]} | {single} | {multi} | {delta} | {interval} |")
    seeds = f" over {n} seeds (mean ± std)" if n > 1 else ""
    dm = f"Δm {summary['delta_m']:+.2f}%" + (f" ± {summary['delta_m_std']:.2f}" if n > 1 else "")
    line = f"\n{dm}{seeds} ({how})"
    if "delta_m_interval" in summary:
        lo, hi = summary["delta_m_interval"]
        better = 100 * summary["p_better"]
        line += f"; 95% interval [{lo:+.2f}, {hi:+.2f}]%, {label} better in {better:.0f}% of resamples"
    worst = summary["worst_task"]
    line += (
        f"; {summary['below_baseline']} of {len(metric)} tasks below their single-task baseline; "
        f"worst: {worst} ({summary['tasks'][worst]['relative_delta']:+.1f}%)"
    )
    return "\n".join(lines) + "\n" + line


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


def _step(count: dict | None) -> str:
    """'k/N ' for compare's k-th of N runs (each run shows its own progress bar)."""
    if count is None:
        return ""
    count["done"] += 1
    return f"{count['done']}/{count['total']} "


def _fine_tuned(
    cfg: RunConfig,
    reuse: bool,
    overwrite: bool,
    resume: bool = False,
    count: dict | None = None,
    reused: dict | None = None,
) -> dict:
    """The run's `fine_tuned` results (metrics and per-row scores), trained unless reused. A
    reused run trained with other settings than `cfg` asks is named with them, and kept in
    `reused` (run dir -> {key: (saved, asked)})."""
    run_dir = Path(cfg.output)
    if (reuse or resume) and (run_dir / rundir.RESULTS).is_file():
        done = rundir.read_results(run_dir).get("fine_tuned")
        if done:
            changes = rundir.reused_changes(cfg)
            other = f", trained with other settings: {rundir.describe_changes(changes)}" if changes else ""
            print(f"[compare] {_step(count)}reusing {run_dir}{other}")
            if changes and reused is not None:
                reused[str(run_dir)] = changes
            return done
    started = resume and (run_dir / rundir.CONFIG).is_file()
    what = "continuing" if started else "training"
    epochs = cfg.train.epochs
    length = f"{cfg.train.max_steps} steps" if cfg.train.max_steps else f"{epochs:g} epoch{'s' if epochs != 1 else ''}"
    print(f"[compare] {_step(count)}{what} {run_dir} ({', '.join(cfg.task_names)}, {length})")
    return train(cfg, overwrite=overwrite, resume=started)["fine_tuned"]


def _merged(
    singles: list[Path], out: Path, how: dict, reuse: bool, overwrite: bool, resume: bool, count: dict | None = None
) -> dict:
    """The merged single-task LoRAs' `fine_tuned` results, merged unless reused."""
    from multitune.merging import merge_runs

    if (reuse or resume) and (out / rundir.RESULTS).is_file():
        done = rundir.read_results(out).get("fine_tuned")
        if done:
            print(f"[compare] {_step(count)}reusing {out}")
            return done
    print(f"[compare] {_step(count)}merging {len(singles)} single-task runs ({how['method']}) into {out}")
    # a merge that stopped before its results is redone: it is a run dir of ours, and cheap
    return merge_runs(singles, out, **how, overwrite=overwrite or resume)["fine_tuned"]
