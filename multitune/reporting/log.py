"""Reading a run's metrics.jsonl back into per-task series."""

from __future__ import annotations

import json
from pathlib import Path

from multitune.errors import MultituneError

RUN_WIDE = ""  # the series key of a figure that belongs to the whole run, not to one task


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl, in file order; [] when there is none yet.

    A run still training may be halfway through writing its last line: that line alone is skipped
    when it is not JSON yet. Any other bad line is one error naming the file, the line and the field.
    """
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # no newline after it: still being written
                continue
            raise MultituneError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise MultituneError(f"{path}:{n}: not a JSON object")
        if not isinstance(record.get("step"), int):
            raise MultituneError(f"{path}:{n}: field 'step' must be an integer, got {record.get('step')!r}")
        if not isinstance(record.get("split"), str):
            raise MultituneError(f"{path}:{n}: field 'split' must be a string, got {record.get('split')!r}")
        records.append(record)
    return records


def series(records: list[dict], split: str, key: str) -> dict[str, tuple[list[int], list[float]]]:
    """{task: (steps, values)} of one figure of one split; the run-wide figure under RUN_WIDE.
    Records without the figure (or with null, e.g. no gradient clipping) are left out."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        value = r.get(key)
        if r["split"] != split or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        steps, values = out.setdefault(r.get("task", RUN_WIDE), ([], []))
        steps.append(r["step"])
        values.append(float(value))
    return out
