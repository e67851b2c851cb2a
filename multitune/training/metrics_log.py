"""The run's record of figures: RUN/metrics.jsonl (one JSON object per line, per task; the
report reads it) and the same figures to every tracker of `train.report_to`
(training/tracking.py), plus the per-task loss window between two log lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from multitune import rundir
from multitune.files import write_atomic
from multitune.training.tracking import Trackers


class MetricsLog:
    """metrics.jsonl and the trackers (main process only; elsewhere every call does nothing)."""

    def __init__(self, run_dir: Path, trackers: Trackers, main: bool):
        self.file = open(run_dir / rundir.METRICS, "a") if main else None  # noqa: SIM115 (closed in close())
        self.trackers = trackers

    def write(self, record: dict, per_task: dict[str, dict]) -> None:
        """One record (and its per-task figures) to metrics.jsonl and to every tracker: `split/key`
        and `split/task/key`, so each task keeps its own series."""
        if self.file is None:
            return
        step, split = record["step"], record["split"]
        self.file.write(json.dumps(record) + "\n")
        for task, figures in per_task.items():
            self.file.write(json.dumps({"step": step, "split": split, "task": task, **figures}) + "\n")
        values = {f"{split}/{key}": value for key, value in record.items() if key not in ("step", "split")}
        self.trackers.log({**values, **series(split, per_task)}, step)

    def flush(self) -> None:
        """To disk before a checkpoint: the log never lags the state a resume starts from."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def series(split: str, per_task: dict[str, dict]) -> dict:
    return {f"{split}/{task}/{key}": value for task, figures in per_task.items() for key, value in figures.items()}


def truncate_log(path: Path, step: int, say) -> None:
    """Drop lines written after the checkpoint we resume from (they will be written again), and
    a last line torn by a crash between two writes."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            say(f"[resume] {path}: dropping its torn last line ({len(lines[-1])} characters)")
            lines.pop()
    keep = []
    for line in lines:
        if not line.strip():
            continue
        try:
            row_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            row_step = None
        if not isinstance(row_step, int | float) or row_step <= step:  # a line that is not ours: kept as it is
            keep.append(line)
    write_atomic(path, "".join(line + "\n" for line in keep))


class LossWindow:
    """Per-task losses between two log lines: what the next train line of metrics.jsonl records,
    and what the progress bar shows as it accumulates."""

    def __init__(self, tasks: list[str], reduce_sum=None):
        """`reduce_sum` (several processes: a tensor summed over them, e.g. Accelerator.reduce):
        each step's figures are added up over the processes at its end (`end_step`), so every
        process holds the window of all rows, which the main process logs and checkpoints."""
        self.tasks = tasks
        self.sums = {t: 0.0 for t in tasks}
        self.counts = {t: 0 for t in tasks}
        self.tokens = {t: 0 for t in tasks}
        self.last: dict[str, float] = {}
        self.reduce_sum = reduce_sum
        self._step = torch.zeros(len(tasks), 3, dtype=torch.float64)  # this process's rows of the step

    def add(self, batch, row_loss: torch.Tensor, rows: torch.Tensor) -> tuple[int, int]:
        """Record one micro-batch; returns its (non-pad tokens, target tokens)."""
        tids = batch.row_task_ids.tolist()
        row_tokens = batch.row_tokens().tolist()
        for tid, loss, n in zip(tids, row_loss.tolist(), row_tokens, strict=True):
            if self.reduce_sum is not None:
                self._step[tid] += torch.tensor([loss, 1.0, float(n)], dtype=torch.float64)
                continue
            t = self.tasks[tid]
            self.sums[t] += loss
            self.counts[t] += 1
            self.tokens[t] += n
        return int(sum(row_tokens)), int(rows.numel())

    def end_step(self) -> None:
        """With several processes: add the step's rows of every process to the window (a collective
        call: every process makes it at the end of every step)."""
        if self.reduce_sum is None:
            return
        total, self._step = self.reduce_sum(self._step), torch.zeros_like(self._step)
        for t, (loss, count, tokens) in zip(self.tasks, total.tolist(), strict=True):
            self.sums[t] += loss
            self.counts[t] += int(round(count))
            self.tokens[t] += int(round(tokens))

    def state_dict(self) -> dict:
        """Sums since the last log line: a resumed run's next log line covers the same steps."""
        return {"sums": self.sums, "counts": self.counts, "tokens": self.tokens, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.counts, self.tokens = state["sums"], state["counts"], state["tokens"]
        self.last = state.get("last", {})  # checkpoints of earlier versions kept an EMA instead

    def running(self) -> dict[str, float]:
        """Each task's mean row loss since the last log line (the value that line will record), or
        the last logged value right after one."""
        now = {t: self.sums[t] / self.counts[t] for t in self.tasks if self.counts[t]}
        return {t: now.get(t, self.last.get(t)) for t in self.tasks if t in now or t in self.last}

    def flush(self) -> tuple[dict, dict[str, dict]]:
        """(the whole window's loss and rows, per-task loss / rows / tokens); starts a new window."""
        per_task = {
            t: {"loss": self.sums[t] / self.counts[t], "rows": self.counts[t], "tokens": self.tokens[t]}
            for t in self.tasks
            if self.counts[t]
        }
        n = sum(self.counts.values())
        overall = {"loss": sum(self.sums.values()) / max(n, 1), "rows": n}
        self.last.update({t: f["loss"] for t, f in per_task.items()})
        for t in self.tasks:
            self.sums[t], self.counts[t], self.tokens[t] = 0.0, 0, 0
        return overall, per_task
