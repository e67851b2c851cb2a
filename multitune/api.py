"""The Python API: what each command does, as a function that returns its result (nothing is
printed) and changes no process-wide setting (threads, allocator, logging: the command line sets
those). `import multitune` exposes these functions; docs/python-api.md shows them at work."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from multitune import rundir
from multitune.config import RunConfig, apply_override, as_config, load_config, resolve_paths, validate_config
from multitune.data.sources import parse_jsonl, row_to_example
from multitune.errors import MultituneError
from multitune.evaluation.evaluator import evaluate as run_evaluation
from multitune.evaluation.evaluator import predict as run_prediction
from multitune.lock import RunLock
from multitune.methods.registry import method
from multitune.models.base import resolve_model_dir
from multitune.models.load import base_model_path, load_base, load_trained_model, point_adapter_at_base
from multitune.progress import progress
from multitune.reporting.tables import results_table
from multitune.runtime import threads


def _config_for(target: str | Path | dict | RunConfig, overrides: list[str]) -> tuple[RunConfig, Path | None]:
    """A run dir's saved config, or a config (YAML path, dict, RunConfig), with overrides applied."""
    if not isinstance(target, str | Path):
        return as_config(target, overrides), None
    target = Path(target)
    if target.is_dir():
        cfg = rundir.load_run_config(target)
        if overrides:
            raw = cfg.model_dump(mode="json")
            for item in overrides:
                apply_override(raw, item)
            cfg = resolve_paths(validate_config(raw, source=str(target / rundir.CONFIG)))
        return cfg, target
    return as_config(target, overrides), None


def train(
    config: str | Path | dict | RunConfig,
    overrides: list[str] | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
) -> dict:
    """Fine-tune as `multitune train` does; returns the run's results.json content (zero-shot and
    fine-tuned metrics per task, the training summary). `config`: a YAML path, a dict of the
    YAML's content or a RunConfig; `overrides`: `key.sub=value` strings."""
    from multitune.training.loop import train as run_training

    return run_training(as_config(config, overrides), overwrite=overwrite, resume=resume)


def evaluate(
    target: str | Path | dict | RunConfig,
    overrides: list[str] | None = None,
    *,
    base: bool = False,
    split: str | None = None,
    tasks_from: str | Path | None = None,
    task_fallback: str | None = None,
) -> dict:
    """Evaluate a run's model (a run dir) or the base model of a config; returns {"model":
    "trained" | "base", "split", "results" (metrics per task, per-row scores), "table" (markdown),
    "saved" (the file it was written to, or None)}.

    For a run dir, the result goes to a file of its own, `RUN/evals/<time>-<model>-<split>-n<rows>
    .json` (and `.md`): the run's results.json stays the record of its training. The table sets
    the new column beside the run's own zero-shot one only when both scored the same rows of
    the same split. `tasks_from`: evaluate on the tasks of another run YAML instead; tasks a
    task-gated model was not trained on need `task_fallback` ("common": its common experts only).
    """
    cfg, run_dir = _config_for(target, overrides or [])
    if split is not None:
        cfg.eval.split = split
    if tasks_from is not None:
        cfg.tasks = load_config(tasks_from).tasks
    if run_dir is None and not base:
        base = True  # a config has no trained model: evaluate its base model
    rows = rundir.load_examples(cfg, cfg.eval.split)
    if not rows:
        raise MultituneError(f"no task of {target} has a {cfg.eval.split} split: nothing to evaluate")
    with threads(cfg.train.threads):
        if base:
            model, tokenizer = load_base(cfg)
        else:
            model, tokenizer = load_trained_model(run_dir, cfg)
        gate_ids = None if base else method(cfg.method.name).task_ids(model, cfg.task_names, task_fallback)
        result = run_evaluation(model, rundir.make_encoder(cfg, tokenizer), cfg, rows, gate_ids=gate_ids)
    key = "zero_shot" if base else "fine_tuned"
    out = {"model": "base" if base else "trained", "split": cfg.eval.split, "results": result, "saved": None}
    if run_dir is None:
        out["table"] = results_table({key: result}, cfg)
    else:
        paired = tasks_from is None
        out["table"], out["saved"] = rundir.write_evaluation(run_dir, key, cfg.eval.split, result, cfg, paired)
    return out


def predict(
    run: str | Path,
    task: str,
    rows: Iterable[dict] | str | Path,
    *,
    base: bool = False,
    tasks_from: str | Path | None = None,
    task_fallback: str | None = None,
) -> list[dict]:
    """Each input row with its prediction added, in input order. `rows`: dicts with the fields
    the task's prompt reads, or a JSONL file of them. `tasks_from` / `task_fallback`: as for
    `evaluate`, for a task defined outside the run."""
    if isinstance(rows, str | Path):
        with open(rows, "rb") as f:
            parsed = [(f"{rows}:{lineno}", row) for lineno, row in parse_jsonl(f, str(rows))]
    else:
        parsed = [(f"rows[{i}]", row) for i, row in enumerate(rows)]
        for where, row in parsed:
            if not isinstance(row, dict):
                raise MultituneError(f"{where}: a row is a dict of fields, not {type(row).__name__}")
    return predict_parsed(Path(run), task, parsed, "rows", base, tasks_from, task_fallback)


def predict_parsed(
    run_dir: Path,
    task_name: str,
    parsed: list[tuple[str, dict]],
    source: str,
    base: bool = False,
    tasks_from: str | Path | None = None,
    task_fallback: str | None = None,
) -> list[dict]:
    """`predict` on rows already read: (where, row) pairs, `where` naming each row in errors."""
    cfg = rundir.load_run_config(run_dir)
    if tasks_from is not None:
        cfg.tasks = load_config(tasks_from).tasks
    task = cfg.task(task_name)
    examples = [row_to_example(task, row, where, need_target=False) for where, row in parsed]
    if not examples:
        raise MultituneError(f"{source}: no input rows")
    with threads(cfg.train.threads):
        model, tokenizer = load_base(cfg) if base else load_trained_model(run_dir, cfg)
        gate_ids = None if base else method(cfg.method.name).task_ids(model, [task.name], task_fallback)
        encoder = rundir.make_encoder(cfg, tokenizer)
        with progress(len(examples), "predict", every=30) as bar:
            preds = run_prediction(
                model,
                encoder,
                task,
                examples,
                cfg.eval.batch_size,
                cfg.eval.max_new_tokens,
                gate_ids[task.name] if gate_ids else None,
                bar.update,
            )
    return [{**row, **pred} for (_, row), pred in zip(parsed, preds, strict=True)]


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def export(
    run_dir: str | Path,
    task: str | None = None,
    fmt: str = "peft-lora",
    out: str | Path | None = None,
    max_rank: int | None = None,
    dtype: str | None = None,
) -> Path:
    """Write a run's model for serving without multitune; returns the folder.

    peft-lora: a plain PEFT LoRA adapter as vLLM, SGLang and LoRAX load it (`peft_type: LORA`,
    `bias: none`, no `modules_to_save`, no DoRA, rsLoRA's scaling folded into lora_alpha; for
    task-gated experts task `task`'s gate folded into B, rank = its common + specific ranks);
    `max_rank`: re-factorised to that rank by truncated SVD where larger, the relative error it
    introduced recorded in the folder's multitune_export.json. merged: full safetensors weights
    with the update merged in (for task-gated experts: task `task`'s).
    """
    if dtype is not None and dtype not in DTYPES:
        raise MultituneError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if dtype is not None and fmt != "merged":
        raise MultituneError("--dtype converts merged weights: it goes with --format merged")
    run_dir = Path(run_dir)
    cfg = rundir.load_run_config(run_dir)
    how = method(cfg.method.name)
    if how.per_task and task is None:
        raise MultituneError(f"{how.name} keeps one update per task: pass --task (one of {', '.join(cfg.task_names)})")
    if task is not None:
        cfg.task(task)  # unknown task: clear error, for every method
    if fmt == "peft-lora" and getattr(cfg.method, "dora", False):
        raise MultituneError(
            "a DoRA update is not a plain LoRA (its magnitude vector rescales every weight column): "
            "vLLM, SGLang and LoRAX load plain LoRA only; export it with --format merged"
        )
    if fmt == "merged" and cfg.load_in is not None:
        raise MultituneError(
            f"a load_in: {cfg.load_in} run trained on a quantized base: export --format peft-lora, an adapter "
            "of the full-precision base model"
        )
    if max_rank is not None and fmt != "peft-lora":
        raise MultituneError("--max-rank re-factorises a LoRA: it goes with --format peft-lora")
    if fmt not in ("peft-lora", "merged"):
        raise MultituneError(f"unknown export format '{fmt}': use peft-lora or merged")
    if fmt == "peft-lora" and how.export_lora is None:  # refused before any model loads
        where = Path(run_dir) / rundir.MODEL
        extra = f": its PEFT adapter is {where} (load it with multitune imported)" if how.saves_adapter else ""
        raise MultituneError(how.no_lora + extra)
    out = Path(out) if out is not None else rundir.child(run_dir / rundir.EXPORT, f"{task or how.name}-{fmt}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MultituneError(f"export target {out} is not empty")
    with RunLock(run_dir):
        return _export(run_dir, cfg, task, fmt, out, max_rank, dtype)


def _export(
    run_dir: Path, cfg: RunConfig, task: str | None, fmt: str, out: Path, max_rank: int | None, dtype: str | None
) -> Path:
    with progress(3, "export", every=0.0) as bar:  # minutes for a large model on a CPU: a line per step
        _export_steps(run_dir, cfg, task, fmt, out, max_rank, dtype, bar)
    return out


def _export_steps(run_dir: Path, cfg: RunConfig, task, fmt: str, out: Path, max_rank, dtype, bar) -> None:
    import shutil

    how = method(cfg.method.name)
    model, tokenizer = load_trained_model(run_dir, cfg)
    bar.set_postfix({"done": "model loaded"})
    bar.update()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if fmt == "merged" and how.merge is None:  # a non-linear adapter: the base and the adapter side by side
        from multitune.methods.adapter import MERGE_ERROR

        print(f"note: {MERGE_ERROR}; writing the base model and the adapter instead")
        model.save_pretrained(str(tmp / "adapter"))
        point_adapter_at_base(tmp / "adapter", cfg)
        base, _ = load_base(cfg)
        _cast(base, dtype).save_pretrained(str(tmp / "base"))
        tokenizer.save_pretrained(str(tmp / "base"))
    elif fmt == "peft-lora":
        base = resolve_model_dir(base_model_path(cfg), cfg.cache_dir)
        info = how.export_lora(model, cfg, task, tmp, base, max_rank)
        record = {"run": str(run_dir), "task": task, "method": how.name, "max_rank": max_rank, **info}
        (tmp / "multitune_export.json").write_text(json.dumps(record, indent=1) + "\n")
    else:
        _cast(how.merge(model, task), dtype).save_pretrained(str(tmp))
    bar.set_postfix({"done": f"{fmt} weights written"})
    bar.update()
    tokenizer.save_pretrained(str(tmp))
    from multitune.reporting.model_card import model_card

    card = model_card(cfg, rundir.read_results(run_dir), adapter=fmt == "peft-lora", task=task)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    if out.exists():  # an empty folder the user made for it
        out.rmdir()
    tmp.rename(out)
    bar.set_postfix({"done": "tokenizer and model card"})
    bar.update()


def _cast(model, dtype: str | None):
    """Weights in `dtype` for serving: half precision is half the size, what GPU servers load anyway."""
    if dtype is None:
        return model
    import torch

    return model.to(getattr(torch, DTYPES[dtype]))


def gates_run(run_dir: Path) -> tuple[str, Path]:
    """The gate weights of each task over the experts: a markdown table and a heatmap PNG."""
    from multitune.methods.registry import GATED

    cfg = rundir.load_run_config(run_dir)
    if not method(cfg.method.name).gated:
        raise MultituneError(f"a '{cfg.method.name}' run has no gates (only {', '.join(GATED)} do)")
    from multitune.methods.experts import plot_gates

    model, _ = load_trained_model(run_dir, cfg)
    names, table = method(cfg.method.name).gates(model)
    png = plot_gates(table, Path(run_dir) / rundir.GATES_PNG, names)
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task, weights in table.items():
        lines.append(f"| {task} | " + " | ".join(f"{w:.3f}" for w in weights) + " |")
    return "\n".join(lines), png


def merge(runs: list[str | Path], output: str | Path, **options) -> dict:
    """Combine LoRA runs into one adapter with PEFT's add_weighted_adapter and evaluate it on every
    task (`multitune merge`): the merged run's results.json content, with its table as "text";
    options: method, weights, density, rank, seed, overwrite (see multitune/merging.py)."""
    from multitune.merging import merge_runs, merged_text

    results = merge_runs(runs, output, **options)
    return {**results, "text": merged_text(results, rundir.load_run_config(output))}


def report(run_dir: str | Path | list[str | Path], out: str | Path | None = None) -> Path:
    """Write the run's HTML report (RUN/report.html, or `out`); several runs: one page putting
    them side by side (`out` needed). Returns its path."""
    if isinstance(run_dir, list | tuple):
        if out is None:
            raise MultituneError("a report of several runs needs --out FILE (it belongs to none of them)")
        from multitune.reporting.page import write_comparison

        return write_comparison(list(run_dir), out)
    from multitune.reporting import write_report

    return write_report(run_dir, out)


def affinity(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, **options) -> dict:
    """Lookahead task affinity over a short run (`multitune affinity`): {"tasks", "matrix",
    "measurements", "clusters", "text"}; options: steps, every, clusters, lookahead_lr, output,
    overwrite."""
    from multitune.analysis.experiments import affinity_run

    return affinity_run(config, overrides, **options)


def compare(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, **options) -> dict:
    """Single-task baselines against the multi-task run (`multitune compare`): per-task deltas,
    Δm, intervals, and the table as "text"; options: singles, reuse, overwrite, resume, seeds, merge
    (also merge the single-task LoRAs with this method and compare that model too), merge_weight,
    merge_density."""
    from multitune.analysis.experiments import compare_run

    return compare_run(config, overrides, **options)
