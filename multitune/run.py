"""The run directory: what a run leaves behind and how the other commands find it again.

runs/x/config.yaml      the resolved config (paths absolute)
runs/x/model/           PEFT adapter (lora) or full weights (full, freeze) + tokenizer
runs/x/metrics.jsonl    every logged figure, per task, one JSON object per line
runs/x/results.json     zero-shot and fine-tuned metrics per task; results.md the table
runs/x/checkpoints/     atomic checkpoints for --resume
runs/x/tb/              TensorBoard events
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from multitune.config import RunConfig, dump_config, load_config
from multitune.data.encode import Encoder
from multitune.data.sources import Example, load_split
from multitune.errors import MultituneError
from multitune.methods import saves_adapter
from multitune.models.base import load_base_model, load_tokenizer, resolve_model_dir
from multitune.tasks.spec import primary_metric

CONFIG = "config.yaml"
MODEL = "model"
RESULTS = "results.json"
TABLE = "results.md"
METRICS = "metrics.jsonl"


def prepare_run_dir(cfg: RunConfig, overwrite: bool, resume: bool) -> Path:
    """Refuse to write into a non-empty run dir unless told to overwrite it or resume it."""
    out = Path(cfg.output)
    if resume:
        if not (out / CONFIG).is_file():
            raise MultituneError(f"--resume: {out} holds no run to resume (no {CONFIG})")
        return out
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MultituneError(
                f"output dir {out} is not empty: pass --overwrite to replace it or --resume to continue it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / CONFIG, dump_config(cfg))
    return out


def load_examples(cfg: RunConfig, split: str) -> dict[str, list[Example]]:
    """Validated examples of one split for every task (tasks without that split are left out)."""
    out = {}
    for task in cfg.tasks:
        limit = task.max_train_examples if split == "train" else (task.max_eval_examples or cfg.eval.max_examples)
        rows = load_split(task, split, limit)
        if rows:
            out[task.name] = rows
    return out


def make_encoder(cfg: RunConfig, tokenizer) -> Encoder:
    return Encoder(
        tokenizer,
        {t.name: i for i, t in enumerate(cfg.tasks)},
        cfg.train.max_length,
        cfg.chat_template,
    )


def load_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise MultituneError(f"{run_dir} is not a run directory (no {CONFIG})")
    return load_config(run_dir / CONFIG)


def load_trained_model(run_dir: str | Path, cfg: RunConfig) -> tuple[torch.nn.Module, object]:
    """The fine-tuned model of a run and its tokenizer."""
    model_dir = Path(run_dir) / MODEL
    if not model_dir.is_dir():
        raise MultituneError(f"{run_dir} has no trained model yet ({MODEL}/ is missing)")
    tokenizer = load_tokenizer(str(model_dir))
    if saves_adapter(cfg.method.name):
        from peft import PeftModel

        import multitune.methods.adapter  # noqa: F401  (registers adapter with PEFT)
        import multitune.methods.experts  # noqa: F401  (registers moe_lora / cgc_lora with PEFT)
        from multitune.methods.lora.layer import fuse_lora_layers

        base = load_base_model(base_model_path(cfg), cfg.cache_dir)
        model = PeftModel.from_pretrained(base, str(model_dir))
        fuse_lora_layers(model)
    else:
        model = load_base_model(str(model_dir))
    return model.eval(), tokenizer


def load_base(cfg: RunConfig) -> tuple[torch.nn.Module, object]:
    path = base_model_path(cfg)
    return load_base_model(path, cfg.cache_dir), load_tokenizer(path, cfg.cache_dir)


def base_model_path(cfg: RunConfig) -> str:
    """`cfg.model`; for an earlier run (`model: runs/dapt`, a domain-adaptive stage) its merged model."""
    path = Path(cfg.model)
    if (path / CONFIG).is_file() and (path / MODEL).is_dir():
        return str(merged_stage(path))
    return cfg.model


def merged_stage(run_dir: Path) -> Path:
    """The model of an earlier run with its update merged into the weights, written once to
    RUN/merged/. The next stage trains a fresh LoRA (or anything else) on top of it: merging costs
    nothing at inference and keeps the next stage's export an ordinary adapter of one base, where
    keeping the first LoRA frozen under the second would make every forward pay for both."""
    out = run_dir / "merged"
    if (out / "config.json").is_file():
        return out
    stage = load_run_config(run_dir)
    if stage.method.name not in ("lora", "full", "freeze"):
        raise MultituneError(
            f"{run_dir} was trained with {stage.method.name}; a run used as a base model must be lora, full or freeze "
            "(their update merges into the weights)"
        )
    model, tokenizer = load_trained_model(run_dir, stage)
    if stage.method.name == "lora":
        model = model.merge_and_unload()
    tmp = run_dir / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    os.rename(tmp, out)
    return out


def save_trained_model(model: torch.nn.Module, tokenizer, run_dir: Path, cfg: RunConfig) -> None:
    """Write model/ atomically (temporary folder, then rename)."""
    final = run_dir / MODEL
    tmp = run_dir / f".{MODEL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if saves_adapter(cfg.method.name):
        point_adapter_at_base(tmp, cfg)
    tokenizer.save_pretrained(str(tmp))
    old = run_dir / f".{MODEL}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def point_adapter_at_base(adapter_dir: Path, cfg: RunConfig) -> None:
    """Name the resolved local base model in adapter_config.json, so plain PEFT loads it offline."""
    conf_path = Path(adapter_dir) / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf["base_model_name_or_path"] = resolve_model_dir(base_model_path(cfg), cfg.cache_dir)
    conf_path.write_text(json.dumps(conf, indent=2))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_results(run_dir: Path) -> dict:
    path = Path(run_dir) / RESULTS
    return json.loads(path.read_text()) if path.is_file() else {}


def write_results(run_dir: Path, results: dict, cfg: RunConfig) -> str:
    """results.json + results.md; returns the markdown table."""
    write_atomic(Path(run_dir) / RESULTS, json.dumps(results, indent=2))
    table = results_table(results, cfg)
    write_atomic(Path(run_dir) / TABLE, table + "\n")
    return table


def results_table(results: dict, cfg: RunConfig) -> str:
    """The markdown form of `results_rows`."""
    header, rows = results_rows(results, cfg)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_rows(results: dict, cfg: RunConfig) -> tuple[list[str], list[list[str]]]:
    """Per task: primary metric (and the others), zero-shot vs fine-tuned, as formatted cells;
    one source for results.md and the HTML report."""
    columns = [c for c in ("zero_shot", "fine_tuned") if c in results]
    both = len(columns) == 2
    header = ["task", "metric", *(c.replace("_", "-") for c in columns)] + (["Δ"] if both else [])
    rows = []
    for task in cfg.tasks:
        for metric in _metrics_of(task, results, columns):
            vals = [results[c]["tasks"].get(task.name, {}).get(metric) for c in columns]
            row = [task.name, metric, *(f"{v:.1f}" if isinstance(v, int | float) else "-" for v in vals)]
            if both:
                a, b = vals
                row.append(f"{b - a:+.1f}" if a is not None and b is not None else "-")
            rows.append(row)
    means = [results[c].get("mean") for c in columns]
    if any(m is not None for m in means):
        row = ["**mean**", "primary", *(f"{m:.1f}" if m is not None else "-" for m in means)]
        if both:
            row.append(f"{means[1] - means[0]:+.1f}" if None not in means else "-")
        rows.append(row)
    return header, rows


def _metrics_of(task, results: dict, columns: list[str]) -> list[str]:
    first = primary_metric(task)
    names = [first]
    for c in columns:
        for name in results[c]["tasks"].get(task.name, {}):
            if name not in names and name != "n":
                names.append(name)
    return names
