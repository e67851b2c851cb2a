"""Per-task predictions and metrics. The same code scores the base model (zero-shot) and a
fine-tuned run, so "before vs after" is one table.

- classification: each label's log-likelihood as a continuation of the prompt; all labels of a
  group of rows go through one batched forward (rows x labels sequences), never one per label;
- extractive QA and generation: batched greedy decoding with the KV cache;
- text: perplexity of the text under the model.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch

from multitune.config import RunConfig, TaskConfig
from multitune.data.collate import collate
from multitune.data.encode import IGNORE, Encoded, Encoder
from multitune.data.sources import Example
from multitune.methods.task_context import task_context
from multitune.models.forward import target_logprobs
from multitune.tasks import metrics
from multitune.tasks.spec import higher_is_better, primary_metric


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    encoder: Encoder,
    task: TaskConfig,
    examples: list[Example],
    batch_size: int = 16,
    max_new_tokens: int = 48,
    task_id: int | None = None,
) -> list[dict]:
    """One dict per example: {"prediction": ...} (+ "scores" per label for classification,
    "nll"/"tokens" for text).

    `task_id`: the id task-gated layers see (default: the task's own; a fallback id for a task
    the model was not trained on).
    """
    was_training = model.training
    model.eval()
    tid = encoder.task_ids[task.name] if task_id is None else task_id
    # one id for the whole call: every row is of this task, and layers repeat it to the batch size
    # longest first, so each batch holds prompts of similar length (little padding); the
    # predictions go back in the caller's order
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt))
    ordered = [examples[i] for i in order]
    try:
        with task_context(torch.tensor([tid])):
            if task.kind == "classification":
                preds = _classify(model, encoder, task, ordered, batch_size)
            elif task.kind == "text":
                preds = text_nll(model, encoder, ordered, batch_size)
            else:
                preds = _generate(model, encoder, ordered, batch_size, max_new_tokens)
    finally:
        model.train(was_training)
    out: list[dict] = [{}] * len(examples)
    for i, pred in zip(order, preds, strict=True):
        out[i] = pred
    return out


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
    prefix: list[int]


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
        return _Prompts(own.input_ids, mask, own.position_ids + n, cache, self.tokens)


def _classify(model, encoder: Encoder, task: TaskConfig, examples, batch_size) -> list[dict]:
    """Score every label as a continuation of each prompt.

    The prompt goes through the model once (its shared prefix once per call); its KV cache is
    then repeated for the labels, so a row costs one prompt forward plus a few label tokens, not
    one full forward per label. The last label token is never fed in: nothing predicts after it.
    """
    label_ids = [encoder.target_ids(label) for label in task.labels]
    n_labels, width = len(label_ids), max(len(ids) for ids in label_ids)
    device = _device(model)
    cont = torch.full((n_labels, width), encoder.tok.pad_token_id, dtype=torch.long)
    cont_mask = torch.zeros((n_labels, width), dtype=torch.long)
    for j, ids in enumerate(label_ids):
        cont[j, : len(ids)] = torch.tensor(ids)
        cont_mask[j, : len(ids)] = 1
    cont, cont_mask = cont.to(device), cont_mask.to(device)
    prompts = [encoder.prompt_ids(ex.prompt, reserve=width)[0] for ex in examples]
    shared = _SharedPrefix(model, prompts)
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = shared.batch(prompts[start : start + batch_size], encoder.tok.pad_token_id, device)
        b = batch.input_ids.shape[0]
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            cache=batch.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): predicts label token 0
        ids = cont.repeat(b, 1)  # (B*L, W): row-major, labels of one prompt together
        tok_logp = first.repeat_interleave(n_labels, 0).gather(1, ids[:, :1])
        if width > 1:  # label tokens 1..W-1, predicted from label tokens 0..W-2 on the repeated cache
            cache = out.cache
            cache.batch_repeat_interleave(n_labels)
            mask = torch.cat(
                [batch.attention_mask.repeat_interleave(n_labels, 0), cont_mask[:, :-1].repeat(b, 1)], dim=1
            )
            last_pos = batch.position_ids[:, -1:].repeat_interleave(n_labels, 0)
            positions = last_pos + 1 + torch.arange(width - 1, device=device)[None]
            rest = model(input_ids=ids[:, :-1], attention_mask=mask, position_ids=positions, cache=cache)
            logp_rest = torch.log_softmax(rest.logits.float(), dim=-1)
            tok_logp = torch.cat([tok_logp, logp_rest.gather(2, ids[:, 1:, None])[..., 0]], dim=1)
        totals = (tok_logp * cont_mask.repeat(b, 1)).sum(1).view(b, n_labels).cpu()
        for scores in totals.tolist():
            best = max(range(n_labels), key=scores.__getitem__)
            results.append({"prediction": task.labels[best], "scores": dict(zip(task.labels, scores, strict=True))})
    return results


def _generate(model, encoder: Encoder, examples, batch_size, max_new_tokens) -> list[dict]:
    """Batched greedy decoding with the KV cache, starting from the shared prefix's cache."""
    tok = encoder.tok
    device = _device(model)
    prompts = [encoder.prompt_ids(ex.prompt, reserve=max_new_tokens)[0] for ex in examples]
    shared = _SharedPrefix(model, prompts)
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = shared.batch(prompts[start : start + batch_size], tok.pad_token_id, device)
        prefix = torch.tensor(batch.prefix, dtype=torch.long, device=device).expand(batch.input_ids.shape[0], -1)
        input_ids = torch.cat([prefix, batch.input_ids], dim=1)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=batch.attention_mask,
            cache=batch.cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=encoder.eos,
        )
        new = out[:, input_ids.shape[1] :]
        for text in tok.batch_decode(new, skip_special_tokens=True):
            results.append({"prediction": text.strip()})
    return results


def text_nll(model, encoder: Encoder, examples, batch_size) -> list[dict]:
    results = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate([encoder.encode(ex) for ex in chunk], encoder.tok.pad_token_id)
        logp, rows = target_logprobs(model, batch.to(_device(model)))
        nll = torch.zeros(len(chunk)).index_add_(0, rows.cpu(), -logp.cpu())
        count = torch.zeros(len(chunk)).index_add_(0, rows.cpu(), torch.ones(len(rows)))
        for n, c in zip(nll.tolist(), count.tolist(), strict=True):
            results.append({"prediction": None, "nll": n, "tokens": int(c)})
    return results


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


def evaluate(
    model: torch.nn.Module,
    encoder: Encoder,
    cfg: RunConfig,
    examples: dict[str, list[Example]],
    batch_size: int | None = None,
    gate_ids: dict[str, int] | None = None,
) -> dict:
    """{"tasks": {task: {metric: value, ..., "n": rows}}, "mean": mean primary metric}.

    `gate_ids`: task name -> id seen by task-gated layers, when it differs from the run's order
    (tasks of another config, unknown tasks mapped to a fallback gate)."""
    out: dict = {"tasks": {}}
    for task in cfg.tasks:
        rows = examples.get(task.name) or []
        if not rows:
            continue
        tid = gate_ids.get(task.name) if gate_ids else None
        preds = predict(model, encoder, task, rows, batch_size or cfg.eval.batch_size, cfg.eval.max_new_tokens, tid)
        out["tasks"][task.name] = {**score(task, rows, preds), "n": len(rows)}
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
