"""What the `eval` and `predict` commands do, callable from Python."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from multitune import run as rundir
from multitune.config import RunConfig, apply_override, load_config, resolve_paths, validate_config
from multitune.data.sources import row_to_example
from multitune.errors import MultituneError
from multitune.evaluate.runner import evaluate, predict


def _config_for(target: str | Path, overrides: list[str]) -> tuple[RunConfig, Path | None]:
    """A run dir's saved config or a YAML file, with overrides applied."""
    target = Path(target)
    if target.is_dir():
        cfg = rundir.load_run_config(target)
        if overrides:
            raw = cfg.model_dump(mode="json")
            for item in overrides:
                apply_override(raw, item)
            cfg = resolve_paths(validate_config(raw, source=str(target / rundir.CONFIG)))
        return cfg, target
    return load_config(target, overrides), None


def evaluate_run(
    target: str | Path,
    overrides: list[str] | None = None,
    base: bool = False,
    split: str | None = None,
) -> str:
    """Evaluate a run's model (or the base model) and return the markdown table.

    For a run dir, the result is stored in its results.json (`fine_tuned`, or `zero_shot` with
    base=True) so that the table keeps both columns.
    """
    cfg, run_dir = _config_for(target, overrides or [])
    if split is not None:
        cfg.eval.split = split
    if run_dir is None and not base:
        base = True  # a YAML file has no trained model: evaluate its base model
    rows = rundir.load_examples(cfg, cfg.eval.split)
    if base:
        model, tokenizer = rundir.load_base(cfg)
    else:
        model, tokenizer = rundir.load_trained_model(run_dir, cfg)
    result = evaluate(model, rundir.make_encoder(cfg, tokenizer), cfg, rows)
    key = "zero_shot" if base else "fine_tuned"
    if run_dir is not None and split in (None, rundir.load_run_config(run_dir).eval.split):
        results = rundir.read_results(run_dir)
        results[key] = result
        return rundir.write_results(run_dir, results, cfg)
    return rundir.results_table({key: result}, cfg)


def predict_rows(run_dir: Path, task_name: str, rows: Iterable[str], source: str, base: bool = False) -> Iterator[dict]:
    """Yield each input row with its prediction added, in input order."""
    import json

    cfg = rundir.load_run_config(run_dir)
    task = cfg.task(task_name)
    examples, originals = [], []
    for lineno, line in enumerate(rows, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MultituneError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise MultituneError(f"{source}:{lineno}: expected a JSON object")
        examples.append(row_to_example(task, row, f"{source}:{lineno}", need_target=False))
        originals.append(row)
    if not examples:
        raise MultituneError(f"{source}: no input rows")
    model, tokenizer = rundir.load_base(cfg) if base else rundir.load_trained_model(run_dir, cfg)
    preds = predict(
        model,
        rundir.make_encoder(cfg, tokenizer),
        task,
        examples,
        cfg.eval.batch_size,
        cfg.eval.max_new_tokens,
    )
    for row, pred in zip(originals, preds, strict=True):
        yield {**row, **pred}
