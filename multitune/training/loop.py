"""The training recipe, top to bottom: `setup()` (data, zero-shot eval, model and method,
optimizer, resume) -> `fit()` (the steps) -> `finish()` (best weights, save, final eval).

Runs on `accelerate.Accelerator` (one process by default; `accelerate launch` for DDP/FSDP):
each optimizer step draws `batch_size x processes x grad_accum` rows from the task mixture, every
process takes its own slice, and losses are kept per task from the start. What happens to the
losses is the step update's (training/update.py: mean rows, a balancer, gradient surgery, the
domain term, L2-SP); the figures go to training/metrics_log.py, the diagnostics to
training/probes.py, checkpoints to training/checkpoint.py, early stopping to
training/early_stopping.py.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from transformers import get_scheduler

from multitune import rundir
from multitune.config import RunConfig
from multitune.data.collate import Batch
from multitune.data.mixing import TaskMixture
from multitune.environment import environment
from multitune.errors import MultituneError
from multitune.evaluation.evaluator import evaluate
from multitune.evaluation.retention import retention_change, retention_examples, retention_perplexity
from multitune.files import write_atomic
from multitune.lock import RunLock
from multitune.methods import apply_method, count_parameters, param_groups, saves_adapter, task_gated
from multitune.methods.task_context import task_context
from multitune.models.forward import per_row_nll, target_logprobs, target_logprobs_and_pooled
from multitune.models.load import load_base, save_trained_model
from multitune.progress import progress
from multitune.reporting.model_card import model_card
from multitune.runtime import compile_layers, eager_layers, threads
from multitune.training.batching import layout, pack_length, task_losses
from multitune.training.checkpoint import load_checkpoint, load_latest, save_checkpoint
from multitune.training.early_stopping import restore_best, should_stop
from multitune.training.metrics_log import LossWindow, MetricsLog, series, truncate_log
from multitune.training.probes import Probes
from multitune.training.processes import Processes, check_launch
from multitune.training.sharding import (
    full_state,
    full_weights,
    full_weights_state,
    is_sharded,
    load_full_weights,
)
from multitune.training.stop import StopSignals, check_finite_loss, check_finite_weights
from multitune.training.surgery import per_task_grads
from multitune.training.tracking import Trackers, check_installed
from multitune.training.update import MicroBatch, make_update


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
            recipe = Recipe(cfg, overwrite, resume, lock, cleanup)
            recipe.setup()
            if not recipe.fit(stop_after):
                return recipe.results
            return recipe.finish(final_eval)
    finally:
        lock.release()


class Recipe:
    """One training run. The attributes are what `setup` built; `fit` and `finish` read them."""

    def __init__(self, cfg: RunConfig, overwrite: bool, resume: bool, lock: RunLock, cleanup: ExitStack):
        check_installed(cfg.train.report_to)
        if cfg.train.mixed_precision != "no" and not torch.cuda.is_available():
            raise MultituneError(
                f"train.mixed_precision={cfg.train.mixed_precision} needs a GPU "
                "(on CPU bf16/fp16 are emulated, ~300x slower)"
            )
        self.cfg, self.overwrite, self.resume, self.lock, self.cleanup = cfg, overwrite, resume, lock, cleanup
        # layers that read each row's task leave the parameters of absent tasks without a gradient
        unused = [DistributedDataParallelKwargs(find_unused_parameters=True)] if task_gated(cfg.method) else []
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, kwargs_handlers=unused)
        self.main = self.accelerator.is_main_process
        check_launch(cfg, self.accelerator)  # before anything is written
        self.say = print if self.main else (lambda *a, **k: None)
        self.step = 0
        # what a checkpoint keeps besides the weights: early stopping's record and the throughput counts
        self.state = dict(best=None, best_step=None, bad_evals=0, tokens=0, target_tokens=0, cells=0, seconds=0.0)

    # --- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        self._load_data()  # nothing is written before the output, config, every split and the model are known good
        self.model, self.tokenizer = load_base(self.cfg)
        if self.main:
            rundir.prepare_run_dir(self.cfg, overwrite=self.overwrite, resume=self.resume, lock=self.lock)
        self.accelerator.wait_for_everyone()
        self._encode()
        self._evaluate_base()
        self._apply_method()
        self._build_optimizer()
        self._restore()
        cfg = self.cfg
        self.say(
            f"[train] {self.steps} steps x {self.rows_per_step} rows; mixture "
            + ", ".join(f"{t} {p:.2f}" for t, p in self.mixture.probabilities.items())
        )
        self.trackers = self.cleanup.enter_context(
            Trackers(cfg.train.report_to, self.run_dir, self.step, self.resume, self.main)
        )
        if self.step == 0:
            self.trackers.store_config(cfg.model_dump(mode="json"))
        self.log = MetricsLog(self.run_dir, self.trackers, self.main)
        self.cleanup.callback(self.log.close)

    def _load_data(self) -> None:
        cfg = self.cfg
        self.run_dir = rundir.check_output(cfg, overwrite=self.overwrite, resume=self.resume)
        # every process checks the output before the main process writes anything into it (without
        # the barrier a slower process found the folder the main process had just created "not empty")
        self.accelerator.wait_for_everyone()
        if self.resume:
            self.cfg = cfg = rundir.resumed_config(cfg, self.say)
        self.train_rows = rundir.load_examples(cfg, "train")
        self.eval_rows = rundir.load_examples(cfg, cfg.eval.split)
        self.dev_rows = self.eval_rows if cfg.eval.split == "dev" else rundir.load_examples(cfg, "dev")
        rundir.check_splits(cfg)
        if not self.train_rows:
            raise MultituneError("no task has a train split: nothing to train on")
        if cfg.eval.split != "dev" and not self.eval_rows:
            raise MultituneError(f"eval.split is '{cfg.eval.split}', but no task has a {cfg.eval.split} split")

    def _encode(self) -> None:
        """Every train row as token ids: labelled rows one each, documents in windows."""
        cfg, say = self.cfg, self.say
        self.encoder = encoder = rundir.make_encoder(cfg, self.tokenizer)
        self.encoded = {
            t: [row for ex in rows for row in (encoder.windows(ex) if ex.target is None else [encoder.encode(ex)])]
            for t, rows in self.train_rows.items()
        }
        self.truncated = {t: sum(e.truncated for e in rows) for t, rows in self.encoded.items()}
        for t, n in self.truncated.items():
            n_rows, n_docs = len(self.encoded[t]), len(self.train_rows[t])
            if n:
                say(
                    f"[data] {t}: {n} of {n_rows} train rows longer than max_length "
                    f"{cfg.train.max_length} were truncated (prompt side)"
                )
            elif n_rows > n_docs:
                say(f"[data] {t}: {n_docs} documents in {n_rows} windows of at most {cfg.train.max_length} tokens")
        n_proc = self.accelerator.num_processes
        self.rows_per_step = cfg.train.batch_size * n_proc * cfg.train.grad_accum
        total_rows = sum(len(r) for r in self.encoded.values())
        self.steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * total_rows / self.rows_per_step))

    def _evaluate_base(self) -> None:
        """Zero-shot metrics and the retention baseline, once (a resumed run has them)."""
        cfg, say = self.cfg, self.say
        self.results = rundir.read_results(self.run_dir) if self.resume else {}
        if cfg.eval.zero_shot and "zero_shot" not in self.results:
            say(f"[eval] zero-shot on {cfg.eval.split}: {_sizes(self.eval_rows)}")
            self.results["zero_shot"] = evaluate(self.model, self.encoder, cfg, self.eval_rows)
            if self.main:
                rundir.write_results(self.run_dir, self.results, cfg)
        self.general = retention_examples(cfg) if cfg.retention is not None else None
        if self.general and "retention" not in self.results:
            before = retention_perplexity(self.model, self.encoder, self.general, cfg.eval.batch_size)
            self.results["retention"] = {"before": before}
            say(f"[retention] general-text perplexity before training: {before:.2f} ({len(self.general)} texts)")

    def _apply_method(self) -> None:
        cfg, model = self.cfg, self.model
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        set_seed(cfg.train.seed)  # new weights (LoRA's A) start the same in every run of this seed
        self.model = model = apply_method(model, cfg.method, cfg.tasks)
        self.trainable, self.total = count_parameters(model)
        self.say(
            f"[model] {cfg.model} + {cfg.method.name}: trainable {self.trainable:,} of {self.total:,} parameters "
            f"({100 * self.trainable / self.total:.3f}%)"
        )
        if cfg.train.compile:  # after the method: the layers hold their adapters when traced
            n_compiled = compile_layers(model)
            if n_compiled == 0:
                raise MultituneError(f"train.compile: no repeated decoder layers found in {cfg.model}")
            self.say(f"[model] train.compile: {n_compiled} decoder layers compiled (dynamic shapes)")
        self.pack_length = pack_length(cfg, model, self.accelerator.device)

    def _build_optimizer(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.update = make_update(cfg, self.model, self.steps, self.params).to(acc.device)
        groups = param_groups(self.model, cfg.method, cfg.train.lr) + self.update.param_groups(cfg.train.lr)
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.scheduler = get_scheduler(
            cfg.train.scheduler,
            optimizer,
            num_warmup_steps=int(cfg.train.warmup_ratio * self.steps),
            num_training_steps=self.steps,
        )
        self.probes = Probes(cfg)
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.sharded = is_sharded(self.model)
        if self.sharded:  # FSDP2 put sharded parameters in the model's place (and the optimizer's)
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        sizes = {t: len(r) for t, r in self.encoded.items()}
        self.mixture = TaskMixture(
            sizes, cfg.mixing.strategy, cfg.mixing.temperature, cfg.mixing.weights, cfg.train.seed
        )
        # several processes: global task losses and gradients, every process's rows in the log
        self.processes = Processes(acc) if acc.num_processes > 1 else None
        self.window = LossWindow(cfg.task_names, self.processes.reduce_sum if self.processes else None)
        # gradient surgery on one process without a domain term: one forward per task (_micro_step_by_task)
        self.by_task = self.update.needs_task_grads and self.processes is None and self.update.pooled_layer is None
        set_seed(cfg.train.seed)

    def _restore(self) -> None:
        """On --resume: the newest checkpoint that verifies, and the log cut back to its step."""
        if not self.resume:
            return

        def restore(path: Path) -> dict:
            model = self.accelerator.unwrap_model(self.model)
            saved = load_checkpoint(path, model, self.optimizer, self.scheduler, self.update.modules(), self.sharded)
            self.mixture.load_state_dict(saved.pop("mixture"))
            self.window.load_state_dict(saved.pop("window"))
            self.probes.load_state_dict(saved.pop("trackers"))
            return saved

        found = load_latest(self.run_dir / rundir.CHECKPOINTS, restore, self.say)
        if found is None:
            self.say(f"[resume] {self.run_dir} has no checkpoint yet: training starts again from step 0")
        else:
            path, saved = found
            self.step = saved.pop("step")
            self.state.update(saved)
            self.say(f"[resume] from {path.name}")
        truncate_log(self.run_dir / rundir.METRICS, self.step, self.say)

    # --- fit -------------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None) -> bool:
        """Train to the last step; False when it left early as asked (`stop_after`), with a checkpoint."""
        cfg, acc, k = self.cfg, self.accelerator, len(self.cfg.tasks)
        bar = progress(self.steps, "train", initial=self.step, enabled=self.main)
        stop = False
        self.model.train()
        with StopSignals() as signals, bar:  # the bar closes before an error prints
            while self.step < self.steps and not stop:
                t0 = time.perf_counter()
                step_loss, step_seen = torch.zeros(k), torch.zeros(k)
                for micro in range(cfg.train.grad_accum):
                    last = micro == cfg.train.grad_accum - 1
                    # the task context stays open through the backward: checkpointed layers recompute there;
                    # gradient surgery writes the same combined gradient on every process: DDP must not average
                    sync = last and not self.update.needs_task_grads
                    with acc.no_sync(self.model) if not sync else nullcontext():
                        task_loss, present = self._micro_step(micro)
                    step_loss += torch.where(present, task_loss.detach(), 0).cpu()
                    step_seen += present.cpu()
                self.update.before_optimizer(acc.backward)
                grad_norm = None
                if cfg.train.max_grad_norm is not None:
                    norm = acc.clip_grad_norm_(self.params, cfg.train.max_grad_norm)
                    grad_norm = None if norm is None else float(norm)  # None: DeepSpeed clips in its step
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.update.after_optimizer(step_loss, step_seen)
                self.window.end_step()
                self.step += 1
                self.state["seconds"] += time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix({f"{t} loss": f"{v:.3f}" for t, v in self.window.running().items()})

                if self.step % cfg.train.log_every == 0 or self.step == self.steps:
                    self._log_train(grad_norm)
                if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or self.step == self.steps):
                    stop = self._evaluate_dev()
                periodic = cfg.train.save_every is not None and self.step % cfg.train.save_every == 0
                requested = signals.requested
                if self.processes is not None:  # all stop after the same step, so their checkpoint lines up
                    requested = self.processes.stop_requested(requested)
                if periodic or stop_after == self.step or requested:
                    self._checkpoint()
                if stop_after is not None and self.step >= stop_after:
                    bar.close()
                    self.log.flush()
                    self.say(f"[train] stopped after step {self.step} as asked; continue with --resume")
                    return False
                if requested:
                    bar.close()
                    self.log.flush()
                    where = self.run_dir / rundir.CHECKPOINTS
                    self.say(
                        f"[train] {requested} at step {self.step}: checkpoint saved in {where}; --resume continues"
                    )
                    raise KeyboardInterrupt
        return True

    def _micro_step(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw, forward, probe and backward one micro-batch; its (task losses, tasks present)."""
        cfg, acc, names = self.cfg, self.accelerator, self.cfg.task_names
        n_proc = acc.num_processes
        pairs = self.mixture.next_batch(cfg.train.batch_size * n_proc)[acc.process_index :: n_proc]
        drawn = [self.encoded[t][i] for t, i in pairs]
        per_pair = self.probes.affinity(self.step, micro, self.model, drawn, self.batch_of, self.params)
        if per_pair is not None:
            self.log.write({"step": self.step + 1, "split": "affinity"}, per_pair)
        if self.by_task:
            by_task = {t: [row for (name, _), row in zip(pairs, drawn, strict=True) if name == t] for t in names}
            return self._micro_step_by_task(micro, [rows for rows in by_task.values() if rows])
        batch = self.batch_of(drawn)
        with task_context(batch.context_ids()):
            pooled = None
            if self.update.pooled_layer is not None:
                logp, rows, pooled = target_logprobs_and_pooled(self.model, batch, self.update.pooled_layer)
            else:
                logp, rows = target_logprobs(self.model, batch)
            row_loss = per_row_nll(logp, rows, batch.n_rows, cfg.train.row_loss)
            check_finite_loss(row_loss, self.step + 1, self.scheduler.get_last_lr()[0])
            task_loss, present = task_losses(row_loss, batch.row_task_ids, len(names))
            if self.processes is not None:  # each task over the global batch (training/processes.py)
                task_loss, present = self.processes.task_losses(task_loss, batch.row_task_ids)
            seen = present.nonzero()[:, 0].tolist()
            measure = self.probes.wants_grads(self.step, micro)
            grads = None
            if self.update.needs_task_grads or measure:
                grads = per_task_grads([task_loss[k] for k in seen], self.params)
                if self.processes is not None:
                    grads = self.processes.task_grads(grads)
            if measure:
                summary, per_pair = self.probes.interference(grads, seen)
                self.log.write({"step": self.step + 1, "split": "interference", **summary}, per_pair)
            mb = MicroBatch(row_loss, task_loss, present, batch.row_task_ids, pooled, grads)
            self.update.backward(mb, self.step, acc.backward)
        tokens, targets = self.window.add(batch, row_loss.detach(), rows)
        self.state["tokens"] += tokens
        self.state["target_tokens"] += targets
        self.state["cells"] += batch.input_ids.numel()
        return task_loss, present

    def _micro_step_by_task(self, micro: int, groups: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient surgery on one process: one forward and one backward per task, on its rows only.

        The shared-forward path (`per_task_grads`) runs K backward passes over the whole batch, each
        zero outside its task's rows: (1 + 2K) passes where plain training runs 3, 2.5x the step
        time at K = 4 (docs/performance.md). Here every row goes forward and backward once, as in
        plain training (LibMTL's multi-input mode does the same). Rows never see each other in a
        forward (packed rows attend within themselves), so the per-task gradients are the same up to
        float rounding (tests/test_balance_run.py).
        """
        cfg, k = self.cfg, len(self.cfg.tasks)
        task_loss, present, grads, row_losses, row_tasks = torch.zeros(k), torch.zeros(k, dtype=torch.bool), [], [], []
        for rows_of_task in groups:
            batch = self.batch_of(rows_of_task)
            with task_context(batch.context_ids()):
                logp, rows = target_logprobs(self.model, batch)
                row_loss = per_row_nll(logp, rows, batch.n_rows, cfg.train.row_loss)
                check_finite_loss(row_loss, self.step + 1, self.scheduler.get_last_lr()[0])
                losses, here = task_losses(row_loss, batch.row_task_ids, k)
                grads.append(per_task_grads([losses[here][0]], self.params)[0])
            task_loss += torch.where(here, losses.detach(), 0).cpu()
            present |= here.cpu()
            row_losses.append(row_loss.detach())
            row_tasks.append(batch.row_task_ids)
            tokens, targets = self.window.add(batch, row_loss.detach(), rows)
            self.state["tokens"] += tokens
            self.state["target_tokens"] += targets
            self.state["cells"] += batch.input_ids.numel()
        grads = torch.stack(grads)
        if self.probes.wants_grads(self.step, micro):
            summary, per_pair = self.probes.interference(grads, present.nonzero()[:, 0].tolist())
            self.log.write({"step": self.step + 1, "split": "interference", **summary}, per_pair)
        mb = MicroBatch(torch.cat(row_losses), task_loss, present, torch.cat(row_tasks), None, grads)
        self.update.backward(mb, self.step, self.accelerator.backward)
        return task_loss, present

    def batch_of(self, rows: list) -> Batch:
        """Rows laid out as the training steps lay them out (packed by default)."""
        return layout(rows, self.cfg, self.tokenizer.pad_token_id, self.pack_length).to(self.accelerator.device)

    def _log_train(self, grad_norm: float | None) -> None:
        overall, per_task = self.window.flush()
        update_record, update_per_task = self.update.figures()
        for t, figures in update_per_task.items():
            per_task.setdefault(t, {}).update(figures)
        record = {
            "step": self.step,
            "split": "train",
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": self.state["tokens"] / max(self.state["seconds"], 1e-9),
            **overall,
            **update_record,
        }
        if self.processes is not None and not self.sharded:  # FSDP's shards differ by design
            record["rank_spread"] = self.processes.rank_spread(self.params, self.step)
        self.log.write(record, per_task)

    def _evaluate_dev(self) -> bool:
        """Dev metrics (and retention) at this step; True when early stopping says stop."""
        cfg, model = self.cfg, self.accelerator.unwrap_model(self.model)
        with self.full_weights(), eager_layers(self.model):
            result = evaluate(model, self.encoder, cfg, self.dev_rows)
            per_task = {t: {k: v for k, v in m.items() if k != "n"} for t, m in result["tasks"].items()}
            record = {"step": self.step, "split": "dev", "mean": result["mean"]}
            if self.general:
                ppl = retention_perplexity(self.model, self.encoder, self.general, cfg.eval.batch_size)
                record["retention_perplexity"] = ppl
        self.log.write(record, per_task)
        return should_stop(cfg, result, self.step, self.state, model, self.run_dir, self.say)

    def _checkpoint(self) -> None:
        """Written by the main process; under FSDP every process first helps gather the state."""
        weights = optimizer_state = None
        if self.sharded:
            weights, optimizer_state = full_state(self.model, self.optimizer)
        if not self.main:
            return
        self.log.flush()
        check_finite_weights(list(weights.values()) if self.sharded else self.params, self.step)
        save_checkpoint(
            self.run_dir / rundir.CHECKPOINTS,
            self.step,
            self.accelerator.unwrap_model(self.model),
            self.optimizer,
            self.scheduler,
            {
                **self.state,
                "mixture": self.mixture.state_dict(),
                "window": self.window.state_dict(),
                "trackers": self.probes.state_dict(),
            },
            self.cfg.train.keep_checkpoints,
            self.update.modules(),
            weights=weights,
            optimizer_state=optimizer_state,
        )

    def full_weights(self):
        """Under FSDP, the weights whole for evaluation and saving (training/sharding.py)."""
        if not self.sharded:
            return nullcontext()
        return full_weights(self.model, self.accelerator.state.fsdp_plugin.reshard_after_forward)

    # --- finish ----------------------------------------------------------------------------

    def finish(self, final_eval: bool = True) -> dict:
        """Best weights back (early stopping), the model saved, final metrics, results.json."""
        cfg, say, results, state = self.cfg, self.say, self.results, self.state
        self.log.close()
        model = self.accelerator.unwrap_model(self.model)
        weights = None
        if self.sharded:  # every process loads the best weights and keeps its shard; then all gather them
            restore_best(cfg, state, model, self.run_dir, say, load=load_full_weights)
            weights = full_weights_state(model, trainable_only=saves_adapter(cfg.method.name))
        else:
            restore_best(cfg, state, model, self.run_dir, say)
        if self.main:
            save_trained_model(model, self.tokenizer, self.run_dir, cfg, weights)
        with self.full_weights(), eager_layers(model):
            if final_eval:
                say(f"[eval] fine-tuned on {cfg.eval.split}: {_sizes(self.eval_rows)}")
                results["fine_tuned"] = evaluate(model, self.encoder, cfg, self.eval_rows)
            if self.general:
                after = retention_perplexity(model, self.encoder, self.general, cfg.eval.batch_size)
                results["retention"] = retention_change(results["retention"]["before"], after)
                say(
                    f"[retention] general-text perplexity {results['retention']['before']:.2f} -> {after:.2f} "
                    f"({results['retention']['change_pct']:+.1f}%)"
                )
        results.update(self.probes.results())
        if self.main:
            self.probes.plot(self.run_dir)
        seconds = max(state["seconds"], 1e-9)
        results["train"] = {
            "steps": self.step,
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "truncated_rows": self.truncated,
            "seconds": round(state["seconds"], 2),
            "tokens_per_s": round(state["tokens"] / seconds, 1),
            "target_tokens_per_s": round(state["target_tokens"] / seconds, 1),
            "rows_per_s": round(self.step * self.rows_per_step / seconds, 3),
            "padding_fraction": round(1 - state["tokens"] / max(state["cells"], 1), 4),
            "balance": cfg.train.balance.method,
            "processes": self.accelerator.num_processes,
            "distributed": "fsdp2" if self.sharded else "ddp" if self.processes is not None else "none",
        }
        results["environment"] = environment(self.accelerator.device)
        if "fine_tuned" in results:
            done = results["fine_tuned"]
            self.trackers.log({"final/mean": done["mean"], **series("final", done["tasks"])}, self.step)
        if self.main:
            rundir.write_results(self.run_dir, results, cfg)  # the command prints its table; the library returns it
            card = model_card(cfg, results, adapter=saves_adapter(cfg.method.name))
            write_atomic(self.run_dir / rundir.MODEL / "README.md", card)
        return results


def _sizes(rows: dict) -> str:
    return ", ".join(f"{t} {len(r)}" for t, r in rows.items())
