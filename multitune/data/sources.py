"""Read a task's rows from files (JSONL, CSV, Parquet) or a Hugging Face dataset, validate
every row, and turn it into an `Example`.

All rows of all splits are checked before a model is loaded: a bad row found after an hour of
training costs an hour. Errors name the file, the line (JSONL and CSV; the row number for
Parquet and hub datasets) and the field.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from multitune.config import TaskConfig
from multitune.errors import MultituneError
from multitune.tasks.templates import render, template_fields
from multitune.textfile import read_text

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
        rows = _read_csv(path)
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
    with path.open("rb") as f:
        return parse_jsonl(f, str(path))


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    """Rows keyed by the header line's column names, with the line each row starts on."""
    text = read_text(path, "utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return []
        names = [h.strip() for h in header]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise MultituneError(
                f"{path}:1: the first line must name the columns (empty or repeated names in {header}); "
                "a CSV file starts with a header line"
            )
        rows = []
        start = reader.line_num + 1
        for values in reader:
            if values:
                if len(values) != len(names):
                    raise MultituneError(f"{path}:{start}: {len(values)} values for the {len(names)} columns {names}")
                rows.append((start, dict(zip(names, values, strict=True))))
            start = reader.line_num + 1
    except csv.Error as e:
        raise MultituneError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return rows


def parse_jsonl(lines: Iterable[bytes | str], source: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line; `source` names the input in errors."""
    rows = []
    for lineno, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MultituneError(
                    f"{source}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None
        else:
            line = raw
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
    """The first `limit` examples of one split of a task; [] when the task has no such split.
    Every row is validated, also those past `limit`: a config that uses more rows later must not
    find a bad one then."""
    source = getattr(task.data, split)
    if source is None:
        return []
    if task.data.hf_dataset is not None:
        rows, origin = _read_hub(task, source), f"{task.data.hf_dataset}[{source}]"
    else:
        rows, origin = read_rows(source), source
        if Path(source).suffix.lower() == ".csv":
            _check_header(task, rows, source)
    if not rows:
        raise MultituneError(f"{origin}: split '{split}' of task '{task.name}' is empty")
    examples = [row_to_example(task, row, f"{origin}:{lineno}") for lineno, row in rows]
    return examples if limit is None else examples[:limit]


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
        if not isinstance(value, str | int | float):
            kind = {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
            raise MultituneError(f"{where}: field '{name}' is {kind}; expected text (task '{task.name}')")
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


def _check_header(task: TaskConfig, rows: list[tuple[int, dict]], source: str) -> None:
    """A CSV file without its header line gives its first row as column names: say so."""
    needed = set(template_fields(task.prompt)) | (template_fields(task.target) if task.target else frozenset())
    columns = list(rows[0][1]) if rows else []
    missing = sorted(needed - set(columns))
    if missing:
        raise MultituneError(
            f"{source}:1: the header line has no column '{missing[0]}' (task '{task.name}'); its columns are "
            f"{columns}: a CSV file starts with a header line naming its columns"
        )


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
