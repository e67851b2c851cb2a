"""Per-task predictions and metrics. The same code scores the base model (zero-shot) and a
fine-tuned run, so "before vs after" is one table.

- classification: each label's log-likelihood as a continuation of the prompt; a batch of
  prompts runs once, then all labels' tokens in one forward on its KV cache, never one
  forward per label;
- extractive QA and generation: batched greedy decoding with the KV cache;
- text: perplexity of the text under the model.

Rows are batched by token length (`length_batches`), and a prefix all prompts share runs once.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from multitune._compat import dynamic_layer_cls
from multitune.config import RunConfig, TaskConfig
from multitune.data.collate import collate
from multitune.data.encode import IGNORE, Encoded, Encoder
from multitune.data.sources import Example
from multitune.evaluation.shards import gathered, rank_and_world
from multitune.methods.task_context import task_context
from multitune.models.forward import target_logprobs
from multitune.progress import progress
from multitune.tasks import metrics
from multitune.tasks.metric_info import higher_is_better, primary_metric


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    encoder: Encoder,
    task: TaskConfig,
    examples: list[Example],
    batch_size: int = 32,
    max_new_tokens: int = 48,
    task_id: int | None = None,
    done: Callable[[int], object] | None = None,
) -> list[dict]:
    """One dict per example: {"prediction": ...} (+ "scores" per label for classification,
    "nll"/"tokens" for text).

    `task_id`: the id task-gated layers see (default: the task's own; a fallback id for a task
    the model was not trained on). `done(n)`: called as each batch of n examples is finished
    (a progress bar).
    """
    done = done or (lambda n: None)
    was_training = model.training
    model.eval()
    tid = encoder.task_ids[task.name] if task_id is None else task_id
    # one id for the whole call: every row is of this task, and layers repeat it to the batch size
    try:
        with task_context(torch.tensor([tid])):
            if task.kind == "classification":
                return _classify(model, encoder, task, examples, batch_size, done)
            if task.kind == "text":
                preds = text_nll(model, encoder, examples, batch_size)
                done(len(examples))
                return preds
            return _generate(model, encoder, examples, batch_size, max_new_tokens, done)
    finally:
        model.train(was_training)


# What one more batch is charged, in padded token cells: it keeps batches from splitting into
# single rows for a few cells (smaller matmuls run at a lower rate) and is small next to a batch
# of 32 prompts of ~100 tokens. `bench/eval.py` prints the padding it leaves.
BATCH_CELLS = 64


def length_batches(
    lengths: list[int], max_rows: int, batch_cells: int = BATCH_CELLS, max_cells: int | None = None
) -> list[list[int]]:
    """Row indices grouped into batches of at most `max_rows` rows (and `max_cells` padded
    cells, unless one row alone is longer) with the least padding.

    Rows sorted by length, longest first, are cut where the total of padded cells (rows x the
    longest row of the batch) plus `batch_cells` per batch is smallest (dynamic programming
    over the cut points; contiguous runs of the sorted rows are optimal for this cost): prompt
    lengths spread widely, so fixed batches of `max_rows` pad much more.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0] + [math.inf] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):
            cells = (j - i) * lengths[order[i]]
            if max_cells is not None and j - i > 1 and cells > max_cells:
                continue
            cost = best[i] + cells + batch_cells
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches = []
    while n:
        batches.append(order[cut[n] : n])
        n = cut[n]
    return batches[::-1]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class _Prompts:
    """A batch of prompts whose shared leading tokens are already in a KV cache.

    Layout of a row: [shared prefix (cached)] [left padding] [the row's own tokens]; the mask
    covers all of it and position ids skip the padding, so every row computes what it computes
    alone.
    """

    input_ids: torch.Tensor  # (B, T): the rows' own tokens, left-padded
    attention_mask: torch.Tensor  # (B, P + T)
    position_ids: torch.Tensor  # (B, T)
    cache: object | None  # the shared prefix's cache repeated to B rows (None: no shared prefix)


class _SharedPrefix:
    """The tokens every prompt of a call starts with (the chat template's system turn, the task's
    lead-in: 26 of sst2's 64 prompt tokens with the bundled model), run through the model once.

    Batches then start from a copy of that cache instead of recomputing the prefix for every
    row. Shorter than `MIN_PREFIX` tokens: not worth a cache copy.
    """

    MIN_PREFIX = 8

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]]):
        n = min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)
        self.tokens = prompts[0][:n] if n >= self.MIN_PREFIX else []
        self.cache = None
        if self.tokens:
            ids = torch.tensor([self.tokens], device=_device(model))
            self.cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).cache

    def batch(self, prompts: list[list[int]], pad_id: int, device: torch.device) -> _Prompts:
        n = len(self.tokens)
        own = collate([Encoded(p[n:], [IGNORE] * (len(p) - n), 0, False) for p in prompts], pad_id).to(device)
        mask = torch.cat([own.attention_mask.new_ones(len(prompts), n), own.attention_mask], dim=1)
        cache = None
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)
            cache.batch_repeat_interleave(len(prompts))
        return _Prompts(own.input_ids, mask, own.position_ids + n, cache)

    def full_ids(self, batch: _Prompts) -> torch.Tensor:
        """The batch's rows with the prefix in front: (B, P + T), as `generate` wants them."""
        prefix = batch.input_ids.new_tensor(self.tokens).expand(batch.input_ids.shape[0], -1)
        return torch.cat([prefix, batch.input_ids], dim=1)


class _LabelTree:
    """All labels of a classification task as one continuation of a prompt.

    Label j's tokens 0..n_j-2 are fed side by side after the prompt, each attending to the
    prompt and to the tokens of its own label before it (a tree of branches, one 4D mask), so a
    batch of rows scores every label in one forward of sum(n_j - 1) tokens per row, with no copy
    of the prompt's KV cache per label and a logit only where a label token is predicted.
    Token 0 of every label is predicted by the prompt's last logit.
    """

    def __init__(self, label_ids: list[list[int]], device: torch.device):
        self.first = torch.tensor([ids[0] for ids in label_ids], device=device)  # (L,)
        fed = [(j, t) for j, ids in enumerate(label_ids) for t in range(len(ids) - 1)]
        self.ids = torch.tensor([label_ids[j][t] for j, t in fed], dtype=torch.long, device=device)  # (F,)
        self.targets = torch.tensor([label_ids[j][t + 1] for j, t in fed], dtype=torch.long, device=device)
        self.owner = torch.tensor([j for j, _ in fed], dtype=torch.long, device=device)
        self.offsets = torch.tensor([t + 1 for _, t in fed], dtype=torch.long, device=device)
        same = self.owner[:, None] == self.owner[None, :]
        self.block = same & (self.offsets[None, :] <= self.offsets[:, None])  # (F, F): own label, causal
        self.n_labels = len(label_ids)

    def score_first(self, last_logits: torch.Tensor) -> torch.Tensor:
        """(B, L): log p of each label's first token from the prompt's last logits (B, V)."""
        return torch.log_softmax(last_logits.float(), dim=-1)[:, self.first]

    def inputs(self, prompt_mask: torch.Tensor, last_position: torch.Tensor, dtype: torch.dtype) -> dict:
        """Model inputs of the branches after a batch of prompts already in the cache."""
        b, n = prompt_mask.shape[0], self.ids.shape[0]
        allowed = torch.cat(
            [prompt_mask.bool()[:, None, None, :].expand(b, 1, n, -1), self.block.expand(b, 1, n, n)], dim=-1
        )
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)  # additive: sdpa and eager read it alike
        return {
            "input_ids": self.ids.expand(b, -1),
            "attention_mask": mask,
            "position_ids": last_position[:, None] + self.offsets[None, :],
        }

    def score_rest(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, L): summed log p of each label's tokens 1.. from the branches' logits (B, F, V)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        tok = logp.gather(2, self.targets.expand(logits.shape[0], -1)[..., None])[..., 0]  # (B, F)
        return torch.zeros(logits.shape[0], self.n_labels, device=logits.device).index_add_(1, self.owner, tok)


def _classify(model, encoder: Encoder, task: TaskConfig, examples, batch_size, done=lambda n: None) -> list[dict]:
    """Score every label as a continuation of each prompt.

    The prompt goes through the model once (its shared prefix once per call), then all labels'
    remaining tokens in one forward on its KV cache (`_LabelTree`): a row costs one prompt
    forward plus sum(n_j - 1) label tokens, not one full forward per label.
    """
    label_ids = [encoder.target_ids(label) for label in task.labels]
    width = max(len(ids) for ids in label_ids)
    device = _device(model)
    tree = _LabelTree(label_ids, device)
    prompts = [encoder.prompt_ids(ex.prompt, reserve=width)[0] for ex in examples]
    shared = _SharedPrefix(model, prompts)
    results: list[dict] = [{}] * len(prompts)
    for rows in length_batches([len(p) - len(shared.tokens) for p in prompts], batch_size):
        batch = shared.batch([prompts[i] for i in rows], encoder.tok.pad_token_id, device)
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            cache=batch.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        scores = tree.score_first(out.logits[:, -1])
        if tree.ids.numel():
            branches = tree.inputs(batch.attention_mask, batch.position_ids[:, -1], model.dtype)
            scores += tree.score_rest(model(**branches, cache=out.cache).logits)
        for i, row in zip(rows, scores.cpu().tolist(), strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            results[i] = {"prediction": task.labels[best], "scores": dict(zip(task.labels, row, strict=True))}
        done(len(rows))
    return results


def _generate(model, encoder: Encoder, examples, batch_size, max_new_tokens, done=lambda n: None) -> list[dict]:
    """Batched greedy decoding with the KV cache, starting from the shared prefix's cache.

    Rows are decoded `batch_size` at a time, longest prompts first.
    """
    tok = encoder.tok
    prompts = [encoder.prompt_ids(ex.prompt, reserve=max_new_tokens)[0] for ex in examples]
    shared = _SharedPrefix(model, prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[dict] = [{}] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask, cache = _prefill(model, shared, [prompts[i] for i in rows], tok.pad_token_id)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=encoder.eos,
            # each process decodes its own rows; under FSDP the weights are gathered for the whole
            # evaluation (training/sharding.py), so no step needs the other processes
            synced_gpus=False,
        )
        new = out[:, input_ids.shape[1] :]
        for i, text in zip(rows, tok.batch_decode(new, skip_special_tokens=True), strict=True):
            results[i] = {"prediction": text.strip()}
        done(len(rows))
    return results


def _prefill(model, shared: _SharedPrefix, prompts: list[list[int]], pad_id: int):
    """(input_ids, attention_mask, cache) for `generate`, the cache holding all but each row's
    last token, in the order of `prompts`.

    The prompts run through the model in groups of similar length (`length_batches`), and
    their caches are padded on the left to one length and stacked: a decoding step reads every
    weight once whatever the number of rows, so the rows stay in one batch for decoding while
    the prompt pass pads little. Models whose cache slides (sliding-window layers) and rows of
    one own token run as one left-padded group.
    """
    device = _device(model)
    n = len(shared.tokens)
    groups = length_batches([len(p) for p in prompts], len(prompts))
    plain = all(type(layer) is dynamic_layer_cls() for layer in DynamicCache(config=model.config).layers)
    if len(groups) == 1 or not plain or min(len(p) for p in prompts) - n < 2:
        batch = shared.batch(prompts, pad_id, device)
        return shared.full_ids(batch), batch.attention_mask, batch.cache
    width = max(len(p) for p in prompts)
    ids, masks, caches = [], [], []
    for group in groups:
        batch = shared.batch([prompts[i] for i in group], pad_id, device)
        out = model(
            input_ids=batch.input_ids[:, :-1],
            attention_mask=batch.attention_mask[:, :-1],
            position_ids=batch.position_ids[:, :-1],
            cache=batch.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        extra = width - batch.attention_mask.shape[1]  # left padding up to the longest group
        ids.append(F.pad(shared.full_ids(batch), (extra, 0), value=pad_id))
        masks.append(F.pad(batch.attention_mask, (extra, 0)))
        caches.append((extra, out.cache))
    cache = caches[0][1]
    for k, layer in enumerate(cache.layers):
        layer.keys = torch.cat([F.pad(c.layers[k].keys, (0, 0, extra, 0)) for extra, c in caches])
        layer.values = torch.cat([F.pad(c.layers[k].values, (0, 0, extra, 0)) for extra, c in caches])
    back = torch.tensor([i for group in groups for i in group], device=device).argsort()  # stacked -> prompts
    cache.batch_select_indices(back)
    return torch.cat(ids)[back], torch.cat(masks)[back], cache


# Tokens per forward when every token is scored (text): each has a vocabulary-sized row of logits,
# 1.6 GB for SmolLM2's 49k vocabulary at 8192 tokens.
TEXT_CELLS = 8192


def text_nll(model, encoder: Encoder, examples, batch_size) -> list[dict]:
    """Summed NLL and predicted-token count of each text, over all its windows (`Encoder.windows`)."""
    windows = [(i, w) for i, ex in enumerate(examples) for w in encoder.windows(ex)]
    nll, count = [0.0] * len(examples), [0] * len(examples)
    for rows in length_batches([len(w.input_ids) for _, w in windows], batch_size, max_cells=TEXT_CELLS):
        batch = collate([windows[j][1] for j in rows], encoder.tok.pad_token_id)
        logp, owner = target_logprobs(model, batch.to(_device(model)))
        row_nll = torch.zeros(len(rows)).index_add_(0, owner.cpu(), -logp.cpu())
        row_count = torch.zeros(len(rows)).index_add_(0, owner.cpu(), torch.ones(len(owner)))
        for j, n, c in zip(rows, row_nll.tolist(), row_count.tolist(), strict=True):
            nll[windows[j][0]] += n
            count[windows[j][0]] += int(c)
    return [{"prediction": None, "nll": n, "tokens": c} for n, c in zip(nll, count, strict=True)]


def score(task: TaskConfig, examples: list[Example], preds: list[dict]) -> dict[str, float]:
    """Metrics of one task from its predictions (0-100 scale; perplexity as is)."""
    if task.kind == "classification":
        p = [x["prediction"] for x in preds]
        g = [ex.target for ex in examples]
        return {"accuracy": metrics.accuracy(p, g), "macro_f1": metrics.macro_f1(p, g, task.labels)}
    if task.kind == "text":
        nll = sum(x["nll"] for x in preds)
        return {"perplexity": metrics.perplexity(nll, sum(x["tokens"] for x in preds))}
    p = [x["prediction"] for x in preds]
    refs = [ex.references for ex in examples]
    if task.kind == "extractive_qa":
        return metrics.squad_scores(p, refs)
    if task.metric == "rouge_l":
        return {"rouge_l": metrics.rouge_l(p, refs)}
    return {"bleu": metrics.bleu(p, refs), "chrf": metrics.chrf(p, refs)}


def row_scores(task: TaskConfig, examples: list[Example], preds: list[dict]) -> list[float] | None:
    """Each row's share of the primary metric (its mean is the metric), kept so that two models
    evaluated on the same rows can be compared row by row (paired bootstrap, `multitune compare
    --seeds`). None where the metric is not a mean over rows (BLEU, chrF, perplexity)."""
    if task.kind == "classification":
        return [100 if x["prediction"] == ex.target else 0 for x, ex in zip(preds, examples, strict=True)]
    if task.kind == "extractive_qa":
        return [
            round(metrics.squad_f1(x["prediction"], ex.references), 4) for x, ex in zip(preds, examples, strict=True)
        ]
    if task.kind == "generation" and task.metric == "rouge_l":
        return [
            round(metrics.rouge_l([x["prediction"]], [ex.references]), 4) for x, ex in zip(preds, examples, strict=True)
        ]
    return None


def evaluate(
    model: torch.nn.Module,
    encoder: Encoder,
    cfg: RunConfig,
    examples: dict[str, list[Example]],
    batch_size: int | None = None,
    gate_ids: dict[str, int] | None = None,
    show_progress: bool = True,
) -> dict:
    """{"tasks": {task: {metric: value, ..., "n": rows}}, "mean": mean primary metric,
    "rows": {task: per-row scores of the primary metric (`row_scores`)}}.

    `gate_ids`: task name -> id seen by task-gated layers, when it differs from the run's order
    (tasks of another config, unknown tasks mapped to a fallback gate)."""
    out: dict = {"tasks": {}}
    rank, world = rank_and_world()
    total = sum(len((examples.get(t.name) or [])[rank::world]) for t in cfg.tasks)
    main = int(os.environ.get("RANK", "0")) == 0  # one bar under `accelerate launch`
    with progress(total, "eval", enabled=main and show_progress, every=30) as bar:
        for task in cfg.tasks:
            rows = examples.get(task.name) or []
            if not rows:
                continue
            bar.set_postfix({"task": task.name})
            tid = gate_ids.get(task.name) if gate_ids else None
            size = batch_size or cfg.eval.batch_size
            # sharded: each process predicts every world-th row, then all of them hold all predictions
            shard = rows[rank::world]  # empty on some processes when a task has fewer rows than processes
            mine = predict(model, encoder, task, shard, size, cfg.eval.max_new_tokens, tid, bar.update) if shard else []
            preds = gathered(mine, len(rows), world)
            out["tasks"][task.name] = {**score(task, rows, preds), "n": len(rows)}
            per_row = row_scores(task, rows, preds)
            if per_row is not None:
                out.setdefault("rows", {})[task.name] = per_row
    out["mean"] = mean_primary(cfg, out["tasks"])
    return out


def mean_primary(cfg: RunConfig, task_scores: dict[str, dict]) -> float | None:
    """Mean of the primary metrics where higher is better (perplexity is kept out of the mean)."""
    values = []
    for task in cfg.tasks:
        metric = primary_metric(task)
        if task.name in task_scores and higher_is_better(metric):
            values.append(task_scores[task.name][metric])
    return sum(values) / len(values) if values else None


def lookup(result: dict, metric: str) -> float:
    """'mean' or 'task/metric' from an evaluate() result."""
    if metric == "mean":
        value = result["mean"]
    else:
        task, _, name = metric.partition("/")
        value = result["tasks"].get(task, {}).get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise KeyError(metric)
    return value
