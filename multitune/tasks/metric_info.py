"""What each task kind means for training and evaluation.

A kind fixes the primary metric (the number used for the run's mean and early stopping) and
whether a larger value is better. Everything else about a task lives in `TaskConfig`.
"""

from __future__ import annotations

from multitune.config import TaskConfig


def primary_metric(task: TaskConfig) -> str:
    if task.kind == "classification":
        return "accuracy"
    if task.kind == "extractive_qa":
        return "f1"
    if task.kind == "generation":
        return task.metric or "rouge_l"
    return "perplexity"


def higher_is_better(metric: str) -> bool:
    return metric != "perplexity"
