"""Train apart, then merge: several LoRA runs (typically one per task) combined into one adapter
with PEFT's `add_weighted_adapter`, written as a run of its own and evaluated on every task.

Merging is what many users do instead of joint training, so multitune measures it beside joint
training (`multitune compare --merge`). The combination is PEFT's; what this module adds is the
checking (same base, plain LoRA, one rank where the method needs it), the run dir (config.yaml
with every source task, model/ a plain PEFT LoRA, results.json with the merged model's scores
and where they came from) and the evaluation.

    cat          the exact weighted sum of the updates, sum_k w_k (s_k B_k A_k) (task arithmetic);
                 its rank is the sum of the ranks
    svd          that sum, truncated to --rank by SVD (default: the largest source rank)
    linear       a weighted sum of the factors A and B (PEFT: fast, a rough approximation)
    ties, dare_ties, dare_linear, magnitude_prune
                 TIES / DARE / pruning on the factors, keeping --density of the values
"""

from __future__ import annotations

import math
from pathlib import Path

from multitune import rundir
from multitune.config import LoraMethod, RunConfig
from multitune.errors import MultituneError
from multitune.files import write_atomic
from multitune.lock import RunLock
from multitune.tasks.metric_info import primary_metric

MERGE_METHODS = ("cat", "svd", "linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")  # combine the factors entry-wise
WITH_DENSITY = ("ties", "dare_ties", "dare_linear", "magnitude_prune")
MERGE_JSON_KEY = "merge"


def _source(run: Path) -> tuple[RunConfig, dict]:
    """A finished plain-LoRA run: its config and its results."""
    cfg = rundir.load_run_config(run)
    if cfg.method.name != "lora":
        raise MultituneError(f"{run}: a '{cfg.method.name}' run; merge combines LoRA runs (method: lora)")
    if cfg.method.dora or cfg.method.rslora:
        what = "DoRA" if cfg.method.dora else "rsLoRA"
        raise MultituneError(
            f"{run}: a {what} run; merge combines plain LoRA runs (PEFT's merge drops {what}'s scaling)"
        )
    if not (run / rundir.MODEL / "adapter_model.safetensors").is_file():
        raise MultituneError(f"{run} has no trained adapter yet ({rundir.MODEL}/adapter_model.safetensors is missing)")
    return cfg, rundir.read_results(run)


def merged_config(sources: list[tuple[Path, RunConfig]], output: str | Path, rank: int) -> RunConfig:
    """The merged run's config: the first source's settings, every source's tasks, a LoRA of the
    merged rank (lora_alpha = rank, as PEFT writes a merged adapter: scaling 1)."""
    from multitune.models.load import base_model_path

    first = sources[0][1]
    for run, cfg in sources[1:]:
        if base_model_path(cfg) != base_model_path(first) or cfg.load_in != first.load_in:
            raise MultituneError(
                f"{run} was trained on {cfg.model}, {sources[0][0]} on {first.model}: one base model only"
            )
    names = [t.name for _, cfg in sources for t in cfg.tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MultituneError(f"task '{dupes[0]}' is in more than one of the runs: merge runs of different tasks")
    merged = first.model_copy(deep=True)
    merged.tasks = [t.model_copy(deep=True) for _, cfg in sources for t in cfg.tasks]
    merged.mixing.weights = None
    merged.method = LoraMethod(
        name="lora", rank=rank, alpha=float(rank), dropout=first.method.dropout, targets=first.method.targets
    )
    merged.output = str(output)
    return merged


def check_options(
    method: str, n_runs: int, weights: list[float] | None, density: float | None, rank: int | None
) -> tuple[list[float], float | None]:
    """(the weights, the density) a merge of `n_runs` runs uses, or one line saying what is wrong."""
    if method not in MERGE_METHODS:
        raise MultituneError(f"unknown merge method '{method}'; choose one of: {', '.join(MERGE_METHODS)}")
    if n_runs < 2:
        raise MultituneError("merge needs at least two runs")
    weights = [1.0] * n_runs if weights is None else [float(w) for w in weights]
    if len(weights) != n_runs:
        raise MultituneError(f"--weights gives {len(weights)} numbers for {n_runs} runs: one per run")
    if not all(math.isfinite(w) for w in weights):
        raise MultituneError(f"--weights must be finite numbers, got {weights}")
    if method in WITH_DENSITY:
        density = 0.5 if density is None else density
        if not 0.0 < density <= 1.0:
            raise MultituneError(f"--density must be in (0, 1], got {density}")
    elif density is not None:
        raise MultituneError(f"--density is for {', '.join(WITH_DENSITY)}, not {method}")
    if rank is not None and method != "svd":
        raise MultituneError(f"--rank is for svd, not {method}")
    if rank is not None and rank < 1:
        raise MultituneError(f"--rank must be >= 1, got {rank}")
    return weights, density


def merge_runs(
    runs: list[str | Path],
    output: str | Path,
    method: str = "cat",
    weights: list[float] | None = None,
    density: float | None = None,
    rank: int | None = None,
    overwrite: bool = False,
    seed: int = 0,
    say=print,
) -> dict:
    """Merge the LoRA runs `runs` into the run `output`, evaluate it on every source task, and
    return its results.json content (`fine_tuned` as after training, `merge` saying how it was
    made and each task's score in its source run)."""
    from multitune.evaluation.evaluator import evaluate as run_evaluation
    from multitune.models.load import save_trained_model
    from multitune.runtime import threads

    paths = [Path(r) for r in runs]
    weights, density = check_options(method, len(paths), weights, density, rank)
    sources = [(p, *_source(p)) for p in paths]
    ranks = [cfg.method.rank for _, cfg, _ in sources]
    if method in SAME_RANK and len(set(ranks)) > 1:
        raise MultituneError(
            f"{method} combines the factors entry by entry and needs one rank; got {ranks}: use cat or svd"
        )
    new_rank = {"cat": sum(ranks), "svd": rank or max(ranks)}.get(method, ranks[0])
    cfg = merged_config([(p, c) for p, c, _ in sources], output, new_rank)
    out = rundir.check_output(cfg, overwrite=overwrite, resume=False)
    examples = rundir.load_examples(cfg, cfg.eval.split)
    lock = RunLock(out)
    try:
        with threads(cfg.train.threads):
            model, tokenizer = _merged_model(cfg, [p for p, _, _ in sources], weights, method, density, rank, seed)
            rundir.prepare_run_dir(cfg, overwrite=overwrite, resume=False, lock=lock)
            save_trained_model(model, tokenizer, out, cfg)
            say(f"[merge] {method} of {len(paths)} runs, rank {new_rank}; evaluating on {cfg.eval.split}")
            result = run_evaluation(model.eval(), rundir.make_encoder(cfg, tokenizer), cfg, examples)
        results = {
            "fine_tuned": result,
            MERGE_JSON_KEY: {
                "method": method,
                "runs": [str(p) for p in paths],
                "weights": weights,
                "density": density,
                "rank": new_rank,
                "seed": seed,
                "source_scores": {
                    t.name: res.get("fine_tuned", {}).get("tasks", {}).get(t.name)
                    for _, c, res in sources
                    for t in c.tasks
                },
            },
        }
        rundir.write_results(out, results, cfg)
        from multitune.reporting.model_card import model_card

        write_atomic(out / rundir.MODEL / "README.md", model_card(cfg, results, adapter=True))
    finally:
        lock.release()
    return results


def _merged_model(cfg: RunConfig, runs: list[Path], weights, method, density, rank, seed) -> tuple:
    """The base with every run's adapter loaded and PEFT's weighted merge as the one adapter "default"."""
    import torch
    from peft import PeftModel

    from multitune.models.load import load_base

    base, tokenizer = load_base(cfg)
    names = [f"run{i}" for i in range(len(runs))]
    try:
        model = PeftModel.from_pretrained(base, str(runs[0] / rundir.MODEL), adapter_name=names[0])
        for name, run in zip(names[1:], runs[1:], strict=True):
            model.load_adapter(str(run / rundir.MODEL), adapter_name=name)
    except Exception as e:  # a damaged or foreign adapter: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MultituneError(f"could not load the runs' adapters: {first}") from None
    torch.manual_seed(seed)  # DARE drops values at random
    options = {"svd_rank": rank} if method == "svd" else {}
    if density is not None:
        options["density"] = density
    try:
        model.add_weighted_adapter(names, weights, "default", combination_type=method, **options)
    except ValueError as e:  # PEFT's checks (targets that differ...), as one line
        raise MultituneError(f"merge ({method}): {str(e).strip().splitlines()[0]}") from None
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    return model, tokenizer


def merged_text(results: dict, cfg: RunConfig) -> str:
    """The merged model's score of each task beside its score in its source run."""
    info = results[MERGE_JSON_KEY]
    lines = ["| task | metric | source run | merged | Δ |", "|---|---|---|---|---|"]
    for spec in cfg.tasks:
        scores = results["fine_tuned"]["tasks"][spec.name]
        source = info["source_scores"].get(spec.name) or {}
        metric = primary_metric(spec)
        before = source.get(metric)
        delta = f"{scores[metric] - before:+.2f}" if before is not None else "-"
        shown = f"{before:.2f}" if before is not None else "-"
        lines.append(f"| {spec.name} | {metric} | {shown} | {scores[metric]:.2f} | {delta} |")
    return "\n".join(lines) + f"\n\n{info['method']} merge of {len(info['runs'])} runs, rank {info['rank']}"
