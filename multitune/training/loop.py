"""The training loop, top to bottom: data -> zero-shot eval -> method -> steps -> final eval.

Runs on `accelerate.Accelerator` (one process by default; `accelerate launch` for DDP/FSDP):
each optimizer step draws `batch_size x processes x grad_accum` rows from the task mixture, every
process takes its own slice, and losses are kept per task from the start.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from multitune import run as rundir
from multitune.config import RunConfig
from multitune.data.collate import Batch, collate, pack
from multitune.data.mixing import TaskMixture
from multitune.domain.regularize import L2SP
from multitune.domain.term import DomainTerm
from multitune.errors import MultituneError
from multitune.evaluation.interference import (
    PairAverage,
    cosine_matrix,
    gradient_report,
    lookahead_affinity,
    plot_matrix,
)
from multitune.evaluation.retention import retention_change, retention_examples, retention_perplexity
from multitune.evaluation.runner import evaluate, lookup
from multitune.lock import RunLock
from multitune.methods import apply_method, count_parameters, param_groups, task_gated
from multitune.methods.task_context import task_context
from multitune.models.attention import skips_other_rows
from multitune.models.forward import per_row_mean_nll, target_logprobs, target_logprobs_and_pooled
from multitune.runtime import compile_layers, eager_layers, threads
from multitune.tasks.spec import higher_is_better
from multitune.training.checkpoint import (
    load_checkpoint,
    load_latest,
    load_trainable,
    save_checkpoint,
    save_weights_atomic,
)
from multitune.training.objectives import make_balancer
from multitune.training.stop import StopSignals, check_finite_loss, check_finite_weights
from multitune.training.surgery import SURGERY, add_grad, cagrad, pcgrad, per_task_grads, surgery_direction
from multitune.training.tracking import Trackers, check_installed


def train(
    cfg: RunConfig,
    overwrite: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    final_eval: bool = True,
) -> dict:
    """Fine-tune `cfg.model` on the mixture of `cfg.tasks`; returns results.json's content.

    `stop_after`: leave after that many optimizer steps (checkpoint saved), as a time-boxed job
    would; `--resume` continues from there. `final_eval=False`: a measuring run (affinity) that
    needs no dev metrics. The run dir is locked against other commands from the moment it is
    written to the end (multitune/lock.py).
    """
    lock = RunLock(cfg.output)
    try:
        with threads(cfg.train.threads), ExitStack() as cleanup:
            return _train(cfg, overwrite, resume, stop_after, final_eval, lock, cleanup)
    finally:
        lock.release()


def _train(
    cfg: RunConfig,
    overwrite: bool,
    resume: bool,
    stop_after: int | None,
    final_eval: bool,
    lock: RunLock,
    cleanup: ExitStack,
) -> dict:
    check_installed(cfg.train.report_to)
    if cfg.train.mixed_precision != "no" and not torch.cuda.is_available():
        raise MultituneError(
            f"train.mixed_precision={cfg.train.mixed_precision} needs a GPU "
            "(on CPU bf16/fp16 are emulated, ~300x slower)"
        )
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    main = accelerator.is_main_process
    say = print if main else (lambda *a, **k: None)

    # --- nothing is written before the output, the config, every data split and the model are known good
    run_dir = rundir.check_output(cfg, overwrite=overwrite, resume=resume)
    if resume:
        cfg = rundir.resumed_config(cfg, say)
    train_rows = rundir.load_examples(cfg, "train")
    eval_rows = rundir.load_examples(cfg, cfg.eval.split)
    dev_rows = eval_rows if cfg.eval.split == "dev" else rundir.load_examples(cfg, "dev")
    rundir.check_splits(cfg)
    if not train_rows:
        raise MultituneError("no task has a train split: nothing to train on")
    if cfg.eval.split != "dev" and not eval_rows:
        raise MultituneError(f"eval.split is '{cfg.eval.split}', but no task has a {cfg.eval.split} split")

    model, tokenizer = rundir.load_base(cfg)
    if main:
        rundir.prepare_run_dir(cfg, overwrite=overwrite, resume=resume, lock=lock)
    accelerator.wait_for_everyone()
    encoder = rundir.make_encoder(cfg, tokenizer)
    encoded = {
        t: [row for ex in rows for row in (encoder.windows(ex) if ex.target is None else [encoder.encode(ex)])]
        for t, rows in train_rows.items()
    }
    truncated = {t: sum(e.truncated for e in rows) for t, rows in encoded.items()}
    for t, n in truncated.items():
        if n:
            say(
                f"[data] {t}: {n} of {len(encoded[t])} train rows longer than max_length "
                f"{cfg.train.max_length} were truncated (prompt side)"
            )
        elif len(encoded[t]) > len(train_rows[t]):
            say(
                f"[data] {t}: {len(train_rows[t])} documents in {len(encoded[t])} windows of at most "
                f"{cfg.train.max_length} tokens"
            )

    results = rundir.read_results(run_dir) if resume else {}
    if cfg.eval.zero_shot and "zero_shot" not in results:
        say(f"[eval] zero-shot on {cfg.eval.split}: {_sizes(eval_rows)}")
        results["zero_shot"] = evaluate(model, encoder, cfg, eval_rows)
        if main:
            rundir.write_results(run_dir, results, cfg)
    general = retention_examples(cfg) if cfg.retention is not None else None
    if general and "retention" not in results:
        before = retention_perplexity(model, encoder, general, cfg.eval.batch_size)
        results["retention"] = {"before": before}
        say(f"[retention] general-text perplexity before training: {before:.2f} ({len(general)} texts)")

    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_seed(cfg.train.seed)  # new weights (LoRA's A) start the same in every run of this seed
    model = apply_method(model, cfg.method, cfg.tasks)
    trainable, total = count_parameters(model)
    say(
        f"[model] {cfg.model} + {cfg.method.name}: trainable {trainable:,} of {total:,} parameters "
        f"({100 * trainable / total:.3f}%)"
    )
    if cfg.train.compile:  # after the method: the layers hold their adapters when traced
        n_compiled = compile_layers(model)
        if n_compiled == 0:
            raise MultituneError(f"train.compile: no repeated decoder layers found in {cfg.model}")
        say(f"[model] train.compile: {n_compiled} decoder layers compiled (dynamic shapes)")

    pack_length = _pack_length(cfg, model, accelerator.device)

    def batch_of(rows: list) -> Batch:
        return _batch(rows, cfg, tokenizer.pad_token_id, pack_length).to(accelerator.device)

    l2sp = L2SP(model.named_parameters(), alpha=cfg.train.l2sp) if cfg.train.l2sp else None
    domain = DomainTerm(cfg, model.config.hidden_size) if cfg.train.domain is not None else None

    # --- optimisation
    n_proc = accelerator.num_processes
    rows_per_step = cfg.train.batch_size * n_proc * cfg.train.grad_accum
    total_rows = sum(len(r) for r in encoded.values())
    steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * total_rows / rows_per_step))
    params = [p for p in model.parameters() if p.requires_grad]
    balancer, surgery = _balance(cfg, task_names := cfg.task_names)
    groups = param_groups(model, cfg.method, cfg.train.lr)
    if balancer is not None:
        balancer.to(accelerator.device)
        if list(balancer.parameters()):  # uncertainty weighting learns its log-variances
            groups.append({"params": list(balancer.parameters()), "lr": cfg.train.lr, "weight_decay": 0.0})
    if domain is not None and domain.classifier is not None:
        domain.classifier.to(accelerator.device)
        lr = cfg.train.lr * cfg.train.domain.lr_ratio  # an adversary slower than the encoder is no adversary
        groups.append({"params": list(domain.classifier.parameters()), "lr": lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(
        cfg.train.scheduler,
        optimizer,
        num_warmup_steps=int(cfg.train.warmup_ratio * steps),
        num_training_steps=steps,
    )
    per_task_gradients = surgery is not None or cfg.train.interference_every or cfg.train.affinity_every
    if per_task_gradients and n_proc > 1:
        raise MultituneError(
            "gradient surgery, interference_every and affinity_every take per-task gradients in one process; "
            "run them without accelerate launch"
        )
    interference = PairAverage(task_names) if cfg.train.interference_every else None
    affinity = PairAverage(task_names) if cfg.train.affinity_every else None
    model, optimizer = accelerator.prepare(model, optimizer)
    mixture = TaskMixture(
        {t: len(r) for t, r in encoded.items()},
        cfg.mixing.strategy,
        cfg.mixing.temperature,
        cfg.mixing.weights,
        cfg.train.seed,
    )
    state = {
        "best": None,
        "best_step": None,
        "bad_evals": 0,
        "tokens": 0,
        "target_tokens": 0,
        "cells": 0,
        "seconds": 0.0,
    }
    set_seed(cfg.train.seed)
    ckpt_root = run_dir / rundir.CHECKPOINTS
    step = 0
    window = _Window(task_names)
    trackers = {"interference": interference, "affinity": affinity}
    modules = {"balancer": balancer} if balancer is not None else {}
    if domain is not None and domain.classifier is not None:
        modules["domain_classifier"] = domain.classifier
    if resume:

        def restore(path: Path) -> dict:
            saved = load_checkpoint(path, accelerator.unwrap_model(model), optimizer, scheduler, modules)
            mixture.load_state_dict(saved.pop("mixture"))
            window.load_state_dict(saved.pop("window"))
            for name, tracker in saved.pop("trackers").items():
                if trackers[name] is not None:
                    trackers[name].load_state_dict(tracker)
            return saved

        found = load_latest(ckpt_root, restore, say)
        if found is None:
            say(f"[resume] {run_dir} has no checkpoint yet: training starts again from step 0")
        else:
            path, saved = found
            step = saved.pop("step")
            state.update(saved)
            say(f"[resume] from {path.name}")
        _truncate_log(run_dir / rundir.METRICS, step, say)

    say(
        f"[train] {steps} steps x {rows_per_step} rows; mixture "
        + ", ".join(f"{t} {p:.2f}" for t, p in mixture.probabilities.items())
    )
    tracking = cleanup.enter_context(Trackers(cfg.train.report_to, run_dir, step, resume, main))
    if step == 0:
        tracking.store_config(cfg.model_dump(mode="json"))
    log = open(run_dir / rundir.METRICS, "a") if main else None
    bar = tqdm(total=steps, initial=step, disable=not main, dynamic_ncols=True, desc="train")
    stop = False
    model.train()

    with StopSignals() as signals, bar:  # the bar closes before an error prints
        while step < steps and not stop:
            t0 = time.perf_counter()
            grad_norm = None
            step_loss = torch.zeros(len(task_names))
            step_seen = torch.zeros(len(task_names))
            for micro in range(cfg.train.grad_accum):
                pairs = mixture.next_batch(cfg.train.batch_size * n_proc)[accelerator.process_index :: n_proc]
                drawn = [encoded[t][i] for t, i in pairs]
                batch = batch_of(drawn)
                sync = micro == cfg.train.grad_accum - 1
                if affinity is not None and micro == 0 and step % cfg.train.affinity_every == 0:
                    z = _measure_affinity(model, drawn, cfg, batch_of, params, affinity)
                    per_pair = {f"{i}>{j}": {"affinity": z[i][j]} for i in z for j in z}
                    _log(log, tracking, {"step": step + 1, "split": "affinity"}, per_pair)
                # the task context stays open through the backward: checkpointed layers recompute there
                with accelerator.no_sync(model) if not sync else nullcontext(), task_context(batch.task_ids):
                    if domain is not None:
                        logp, rows, pooled = target_logprobs_and_pooled(model, batch, cfg.train.domain.layer)
                    else:
                        logp, rows = target_logprobs(model, batch)
                    row_loss = per_row_mean_nll(logp, rows, batch.n_rows)
                    check_finite_loss(row_loss, step + 1, scheduler.get_last_lr()[0])
                    task_loss, present = _task_losses(row_loss, batch.row_task_ids, len(task_names))
                    seen = present.nonzero()[:, 0].tolist()
                    measure = interference is not None and micro == 0 and step % cfg.train.interference_every == 0
                    grads = per_task_grads([task_loss[k] for k in seen], params) if surgery or measure else None
                    if measure:
                        summary, per_pair = gradient_report(grads, [task_names[k] for k in seen])
                        interference.add(seen, cosine_matrix(grads))
                        _log(log, tracking, {"step": step + 1, "split": "interference", **summary}, per_pair)
                    if surgery is not None:
                        direction = surgery_direction(surgery, grads, step)
                        add_grad(params, direction, 1 / (len(task_names) * cfg.train.grad_accum))
                    else:
                        if balancer is not None:
                            loss = balancer.combine(task_loss, present) / len(task_names)
                        else:
                            loss = row_loss.mean()
                        if domain is not None:
                            loss = loss + domain.loss(pooled, batch.row_task_ids, step / steps)
                        accelerator.backward(loss / cfg.train.grad_accum)
                step_loss += torch.where(present, task_loss.detach(), 0).cpu()
                step_seen += present.cpu()
                tokens, targets = window.add(batch, row_loss.detach(), rows, task_names)
                state["tokens"] += tokens
                state["target_tokens"] += targets
                state["cells"] += batch.input_ids.numel()
            if l2sp is not None:  # once per optimizer step: pulls the weights back to the pre-trained ones
                accelerator.backward(l2sp.penalty())
            if cfg.train.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if balancer is not None:
                balancer.update(step_loss / step_seen.clamp(min=1), step_seen > 0)
            step += 1
            state["seconds"] += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix({t: f"{v:.3f}" for t, v in window.running().items()})

            if step % cfg.train.log_every == 0 or step == steps:
                figures = window.flush()
                record = {
                    "step": step,
                    "split": "train",
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_s": state["tokens"] / max(state["seconds"], 1e-9),
                    **figures.pop("_all"),
                }
                if balancer is not None:
                    for t, w in balancer.weights().items():
                        figures.setdefault(t, {})["weight"] = w
                if domain is not None:
                    record.update(domain.flush())
                _log(log, tracking, record, figures)

            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == steps):
                with eager_layers(model):
                    result = evaluate(accelerator.unwrap_model(model), encoder, cfg, dev_rows)
                    per_task = {t: {k: v for k, v in m.items() if k != "n"} for t, m in result["tasks"].items()}
                    record = {"step": step, "split": "dev", "mean": result["mean"]}
                    if general:
                        record["retention_perplexity"] = retention_perplexity(
                            model, encoder, general, cfg.eval.batch_size
                        )
                _log(log, tracking, record, per_task)
                stop = _early_stopping(cfg, result, step, state, accelerator.unwrap_model(model), run_dir, say)

            periodic = cfg.train.save_every is not None and step % cfg.train.save_every == 0
            if main and (periodic or stop_after == step or signals.requested):
                _flush(log)
                check_finite_weights(params, step)
                save_checkpoint(
                    ckpt_root,
                    step,
                    accelerator.unwrap_model(model),
                    optimizer,
                    scheduler,
                    {
                        **state,
                        "mixture": mixture.state_dict(),
                        "window": window.state_dict(),
                        "trackers": {k: v.state_dict() for k, v in trackers.items() if v is not None},
                    },
                    cfg.train.keep_checkpoints,
                    modules,
                )
            if stop_after is not None and step >= stop_after:
                bar.close()
                _flush(log)
                say(f"[train] stopped after step {step} as asked; continue with --resume")
                return results
            if signals.requested:
                bar.close()
                _flush(log)
                say(f"[train] {signals.requested} at step {step}: checkpoint saved in {ckpt_root}; --resume continues")
                raise KeyboardInterrupt
    bar.close()
    if log:
        log.close()

    model = accelerator.unwrap_model(model)
    es = cfg.train.early_stopping
    if es is not None and es.restore_best and (run_dir / "best.safetensors").is_file():
        load_trainable(model, run_dir / "best.safetensors")
        say(f"[train] restored the best weights (step {state['best_step']}, {es.metric}={state['best']:.2f})")
    if main:
        rundir.save_trained_model(model, tokenizer, run_dir, cfg)

    with eager_layers(model):
        if final_eval:
            say(f"[eval] fine-tuned on {cfg.eval.split}: {_sizes(eval_rows)}")
            results["fine_tuned"] = evaluate(model, encoder, cfg, eval_rows)
        if general:
            after = retention_perplexity(model, encoder, general, cfg.eval.batch_size)
            results["retention"] = retention_change(results["retention"]["before"], after)
            say(
                f"[retention] general-text perplexity {results['retention']['before']:.2f} -> {after:.2f} "
                f"({results['retention']['change_pct']:+.1f}%)"
            )
    for name, tracker in trackers.items():
        if tracker is not None and tracker.measurements:
            results[name] = {"tasks": task_names, "matrix": tracker.mean(), "measurements": tracker.measurements}
            if main:
                _plot(tracker, run_dir / f"{name}.png", name)
    results["train"] = {
        "steps": step,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "truncated_rows": truncated,
        "seconds": round(state["seconds"], 2),
        "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
        "target_tokens_per_s": round(state["target_tokens"] / max(state["seconds"], 1e-9), 1),
        "rows_per_s": round(step * rows_per_step / max(state["seconds"], 1e-9), 3),
        "padding_fraction": round(1 - state["tokens"] / max(state["cells"], 1), 4),
        "balance": cfg.train.balance.method,
    }
    if "fine_tuned" in results:
        done = results["fine_tuned"]
        tracking.log({"final/mean": done["mean"], **_series("final", done["tasks"])}, step)
    if main:
        rundir.write_results(run_dir, results, cfg)  # the command prints its table; the library returns it
    return results


def _pack_length(cfg: RunConfig, model, device: torch.device) -> int:
    """`train.pack_length`, or by default 2048 tokens where attention skips the other rows of a
    packed sequence (a CPU: models/attention.py), `max_length` elsewhere. One sequence of a
    whole step's rows leaves no padding, where sequences of at most 512 tokens left 5% of the
    bench's cells: 1.10x (`python bench/parts.py --part layout`). Longer sequences would only add
    to the mask, (length x length) floats. Where attention computes every row against every
    other row (CUDA's kernels with a mask), the attention of a sequence costs its length squared,
    so rows stay in `max_length` sequences there."""
    if cfg.train.pack_length is not None:
        return cfg.train.pack_length
    return max(2048, cfg.train.max_length) if skips_other_rows(model, device) else cfg.train.max_length


def _batch(rows, cfg: RunConfig, pad_id: int, pack_length: int):
    if not cfg.train.packing:
        return collate(rows, pad_id)
    return pack(rows, pad_id, pack_length, by_task=task_gated(cfg.method))


def _task_losses(row_loss: torch.Tensor, row_tasks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each task's mean row loss (K,) and which tasks the batch has (K,) bool."""
    sums = torch.zeros(k, dtype=row_loss.dtype, device=row_loss.device).index_add(0, row_tasks, row_loss)
    counts = torch.bincount(row_tasks, minlength=k)
    return sums / counts.clamp(min=1), counts > 0


def _balance(cfg: RunConfig, tasks: list[str]):
    """(loss balancer or None, surgery function or None) from `train.balance`."""
    b = cfg.train.balance
    if b.method == "rows":
        return None, None
    if b.method == "pcgrad":  # its random task order is drawn from (seed, step): a resumed run repeats it
        return None, lambda grads, step: pcgrad(grads, torch.Generator().manual_seed(cfg.train.seed * 7919 + step))
    if b.method == "cagrad":
        return None, lambda grads, step: cagrad(grads, c=b.cagrad_c)
    if b.method in SURGERY:  # no options, no state
        return None, lambda grads, step: SURGERY[b.method](grads)
    options = {
        "static": {"weights": b.weights},
        "dwa": {"temperature": b.temperature, "beta": b.beta},
        "famo": {"w_lr": b.famo_lr, "gamma": b.famo_decay},
    }.get(b.method, {})
    return make_balancer(b.method, tasks, **options), None


def _measure_affinity(model, rows, cfg: RunConfig, batch_of, params, tracker: PairAverage) -> dict:
    """TAG lookahead affinity on this step's rows (dropout off: the losses must be comparable);
    `batch_of` lays rows out as the training steps do."""
    names = cfg.task_names
    by_task = {}
    for k in sorted({r.task_id for r in rows}):
        by_task[names[k]] = batch_of([r for r in rows if r.task_id == k])

    def task_loss(name: str) -> torch.Tensor:
        batch = by_task[name]
        with task_context(batch.task_ids):
            logp, idx = target_logprobs(model, batch)
            return per_row_mean_nll(logp, idx, batch.n_rows).mean()

    model.eval()
    try:
        z = lookahead_affinity(params, task_loss, list(by_task), cfg.train.affinity_lr or cfg.train.lr)
    finally:
        model.train()
    present = [names.index(t) for t in by_task]
    tracker.add(present, [[z[i][j] for j in by_task] for i in by_task])
    return z


def _plot(tracker: PairAverage, path: Path, name: str) -> None:
    """Heatmap of the averaged matrix, coloured on the off-diagonal range (the diagonal, a task
    with itself, would wash everything else out)."""
    matrix = [[float("nan") if v is None else v for v in row] for row in tracker.mean()]
    off = [abs(v) for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j and v == v]
    span = max(off + [1e-9])
    if name == "interference":
        title = f"per-task gradient cosine\n(mean of {tracker.measurements} steps)"
        plot_matrix(matrix, tracker.tasks, path, title, -span, span, fmt="+.3f")
    else:
        title = f"lookahead affinity, row's step helps column\n(mean of {tracker.measurements} steps)"
        plot_matrix(matrix, tracker.tasks, path, title, -span, span, fmt="+.4f")


class _Window:
    """Per-task running losses between two log lines (and an EMA for the progress bar)."""

    def __init__(self, tasks: list[str]):
        self.tasks = tasks
        self.sums = {t: 0.0 for t in tasks}
        self.counts = {t: 0 for t in tasks}
        self.tokens = {t: 0 for t in tasks}
        self.ema: dict[str, float] = {}

    def add(self, batch, row_loss: torch.Tensor, rows: torch.Tensor, names: list[str]) -> tuple[int, int]:
        """Record one micro-batch; returns its (non-pad tokens, target tokens)."""
        tids = batch.row_task_ids.tolist()
        row_tokens = batch.row_tokens().tolist()
        for tid, loss, n in zip(tids, row_loss.tolist(), row_tokens, strict=True):
            t = names[tid]
            self.sums[t] += loss
            self.counts[t] += 1
            self.tokens[t] += n
            self.ema[t] = loss if t not in self.ema else 0.9 * self.ema[t] + 0.1 * loss
        return int(sum(row_tokens)), int(rows.numel())

    def state_dict(self) -> dict:
        """Sums since the last log line: a resumed run's next log line covers the same steps."""
        return {"sums": self.sums, "counts": self.counts, "tokens": self.tokens, "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.counts, self.tokens, self.ema = state["sums"], state["counts"], state["tokens"], state["ema"]

    def running(self) -> dict[str, float]:
        return dict(self.ema)

    def flush(self) -> dict[str, dict]:
        out = {
            t: {
                "loss": self.sums[t] / self.counts[t],
                "rows": self.counts[t],
                "tokens": self.tokens[t],
            }
            for t in self.tasks
            if self.counts[t]
        }
        n = sum(self.counts.values())
        out["_all"] = {"loss": sum(self.sums.values()) / max(n, 1), "rows": n}
        for t in self.tasks:
            self.sums[t], self.counts[t], self.tokens[t] = 0.0, 0, 0
        return out


def _early_stopping(cfg: RunConfig, result: dict, step: int, state: dict, model, run_dir: Path, say) -> bool:
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
        save_weights_atomic(model, run_dir / "best.safetensors")
        return False
    state["bad_evals"] += 1
    if state["bad_evals"] >= es.patience:
        say(f"[train] early stop at step {step}: {es.metric} has not improved for {es.patience} evals")
        return True
    return False


def _log(log, tracking: Trackers, record: dict, per_task: dict[str, dict]) -> None:
    """One record (and its per-task figures) to metrics.jsonl and to every tracker: `split/key`
    and `split/task/key`, so each task keeps its own series."""
    if log is None:
        return
    step, split = record["step"], record["split"]
    log.write(json.dumps(record) + "\n")
    for task, figures in per_task.items():
        log.write(json.dumps({"step": step, "split": split, "task": task, **figures}) + "\n")
    values = {f"{split}/{key}": value for key, value in record.items() if key not in ("step", "split")}
    tracking.log({**values, **_series(split, per_task)}, step)


def _series(split: str, per_task: dict[str, dict]) -> dict:
    return {f"{split}/{task}/{key}": value for task, figures in per_task.items() for key, value in figures.items()}


def _flush(log) -> None:
    if log is not None:
        log.flush()
        os.fsync(log.fileno())


def _truncate_log(path: Path, step: int, say) -> None:
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
    rundir.write_atomic(path, "".join(line + "\n" for line in keep))


def _sizes(rows: dict) -> str:
    return ", ".join(f"{t} {len(r)}" for t, r in rows.items())
