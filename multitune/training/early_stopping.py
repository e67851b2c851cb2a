"""Early stopping on a dev metric (`train.early_stopping`): patience counted in evaluations, the
best weights kept in RUN/best.safetensors and restored at the end when asked."""

from __future__ import annotations

from pathlib import Path

from multitune import rundir
from multitune.config import RunConfig
from multitune.errors import MultituneError
from multitune.evaluation.evaluator import lookup
from multitune.tasks.metric_info import higher_is_better
from multitune.training.checkpoint import load_trainable, save_weights_atomic

BEST = rundir.BEST


def should_stop(cfg: RunConfig, result: dict, step: int, state: dict, model, run_dir: Path, say) -> bool:
    """After an evaluation: keep the weights if the metric improved, count a bad evaluation if
    not; True once `patience` evaluations in a row did not improve. `state` (best, best_step,
    bad_evals) is saved in checkpoints, so a resumed run counts on."""
    es = cfg.train.early_stopping
    if es is None:
        return False
    try:
        value = lookup(result, es.metric)
    except KeyError:
        raise MultituneError(f"train.early_stopping.metric '{es.metric}' is not among the eval metrics") from None
    larger = es.metric == "mean" or higher_is_better(es.metric.split("/")[-1])
    better = state["best"] is None or (value > state["best"] if larger else value < state["best"])
    if better:
        state.update(best=value, best_step=step, bad_evals=0)
        save_weights_atomic(model, run_dir / BEST)
        return False
    state["bad_evals"] += 1
    if state["bad_evals"] >= es.patience:
        say(f"[train] early stop at step {step}: {es.metric} has not improved for {es.patience} evals")
        return True
    return False


def restore_best(cfg: RunConfig, state: dict, model, run_dir: Path, say, load=load_trainable) -> None:
    """`load(model, path)`: how the weights go in (under FSDP, each process keeps its shard)."""
    es = cfg.train.early_stopping
    if es is not None and es.restore_best and (run_dir / BEST).is_file():
        load(model, run_dir / BEST)
        say(f"[train] restored the best weights (step {state['best_step']}, {es.metric}={state['best']:.2f})")
