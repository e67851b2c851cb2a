"""Read a task's rows from files (JSONL, CSV, Parquet) or a Hugging Face dataset, validate
every row, and turn it into an `Example`.

All rows of all splits are checked before a model is loaded: a bad row found after an hour of
training costs an hour. Errors name the file, the line (JSONL and CSV; the row number for
Parquet and hub datasets) and the field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from multitune.config import TaskConfig
from multitune.errors import MultituneError
from multitune.tasks.templates import render, template_fields

SPLITS = ("train", "dev", "test")


@dataclass
class Example:
    task: str
    prompt: str
    target: str | None  # None for prediction inputs without a gold answer
    references: list[str] = field(default_factory=list)  # gold answers for QA / generation
    where: str = ""  # "file:line", for messages


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(line or row number, row) pairs from a .jsonl/.json, .csv or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise MultituneError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            # line numbers: header is line 1, so row i (0-based) is on line i + 2 for one-line rows
            rows = [(i + 2, dict(r)) for i, r in enumerate(csv.DictReader(f))]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise MultituneError(f"{path}: not a readable Parquet file ({e})") from None
        rows = [(i + 1, r) for i, r in enumerate(table.to_pylist())]
    else:
        raise MultituneError(f"{path}: unknown data format '{suffix}' (use .jsonl, .csv or .parquet)")
    if not rows:
        raise MultituneError(f"{path}: the file has no rows")
    return rows


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        return parse_jsonl(f, str(path))


def parse_jsonl(lines: Iterable[str], source: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line; `source` names the input in errors."""
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MultituneError(f"{source}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise MultituneError(f"{source}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def _read_hub(task: TaskConfig, split_name: str) -> list[tuple[int, dict]]:
    try:
        import datasets

        ds = datasets.load_dataset(task.data.hf_dataset, task.data.hf_subset, split=split_name)
    except Exception as e:  # offline, unknown name, unknown split: all one message for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MultituneError(
            f"task '{task.name}': could not load dataset '{task.data.hf_dataset}' split "
            f"'{split_name}' (offline or unknown name): {first}"
        ) from None
    return [(i + 1, dict(r)) for i, r in enumerate(ds)]


def load_split(task: TaskConfig, split: str, limit: int | None = None) -> list[Example]:
    """Validated examples of one split of a task; [] when the task has no such split."""
    source = getattr(task.data, split)
    if source is None:
        return []
    if task.data.hf_dataset is not None:
        rows, origin = _read_hub(task, source), f"{task.data.hf_dataset}[{source}]"
    else:
        rows, origin = read_rows(source), source
    if not rows:
        raise MultituneError(f"{origin}: split '{split}' of task '{task.name}' is empty")
    if limit is not None:
        rows = rows[:limit]
    return [row_to_example(task, row, f"{origin}:{lineno}") for lineno, row in rows]


def row_to_example(task: TaskConfig, row: dict, where: str, need_target: bool = True) -> Example:
    """Check one row against the task's templates and labels, and render it."""
    needed = set(template_fields(task.prompt))
    if need_target and task.target is not None:
        needed |= template_fields(task.target)
    for name in sorted(needed):
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            state = "missing" if name not in row else "empty"
            raise MultituneError(f"{where}: field '{name}' is {state} (task '{task.name}')")
    prompt = render(task.prompt, row)
    target = render(task.target, row) if (need_target and task.target is not None) else None
    if task.kind == "text":
        return Example(task.name, prompt, None, [], where)
    if target is not None and task.kind == "classification" and target not in task.labels:
        raise MultituneError(
            f"{where}: field '{_label_field(task)}' has label {target!r}, not one of {task.labels} (task '{task.name}')"
        )
    references = _references(task, row, where) if need_target else []
    if target is not None and not target.strip():
        raise MultituneError(f"{where}: the target renders empty (task '{task.name}')")
    if target is not None and not references:
        references = [target]
    return Example(task.name, prompt, target, references, where)


def _label_field(task: TaskConfig) -> str:
    fields = sorted(template_fields(task.target or ""))
    return fields[0] if len(fields) == 1 else "target"


def _references(task: TaskConfig, row: dict, where: str) -> list[str]:
    if task.references is None or task.references not in row:
        return []
    refs = row[task.references]
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise MultituneError(
            f"{where}: field '{task.references}' must be a non-empty list of strings (task '{task.name}')"
        )
    return refs
