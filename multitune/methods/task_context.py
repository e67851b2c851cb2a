"""How the task of every row reaches task-gated layers, without touching the model's code.

The caller opens ``with task_context(batch.task_ids): ...`` around the forward *and* the backward
(and around ``generate``); task-gated layers read the ids from a `contextvars.ContextVar`. Model
source is never patched and the model's forward signature never changes, so any Hugging Face
causal LM works, and PEFT's own forward (which drops unknown keyword arguments) is bypassed.

Why the backward too: with gradient checkpointing the layers run again during the backward, and
they need the same task ids then.

One caveat of context variables: autograd may run the backward (and so the recomputation of
checkpointed layers) on its own worker thread (one per GPU), where the context variable is not
set. `current_task_context` therefore falls back, inside a backward only, to the innermost
context open in the process; with contexts open at once in several threads it refuses to guess
and raises.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from multitune._compat import in_backward

_CURRENT: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar("multitune_task_context", default=None)
_OPEN: list[tuple[int, TaskContext]] = []  # (thread, context) of every open context, for autograd worker threads
_OPEN_LOCK = threading.Lock()

NO_CONTEXT_MESSAGE = (
    "task-gated layer called without task ids: wrap the forward, the backward and generate in "
    "`with multitune.methods.task_context.task_context(task_ids): ...` "
    "(task_ids: LongTensor of shape (batch,), or (batch, tokens) for moe_lora / cgc_lora)"
)


class TaskContext:
    """The task ids of the current batch, plus a per-context cache for what is computed from them.

    The cache holds the per-row gate scales that a model computes once per forward and that every
    layer of that forward reads; it dies with the context, so nothing leaks between batches.
    """

    def __init__(self, task_ids: torch.Tensor) -> None:
        self.task_ids = task_ids
        self.cache: dict[Any, Any] = {}
        # set when a layer sees it runs under no_grad inside a forward that started with grad on,
        # i.e. inside a reentrant checkpoint: then every layer recomputes its scales itself, see layer.py
        self.recompute_per_layer = False
        self._ids_on: dict[torch.device, torch.Tensor] = {}

    def ids_on(self, device: torch.device) -> torch.Tensor:
        """The task ids on `device` (moved once per context, not once per layer)."""
        ids = self._ids_on.get(device)
        if ids is None:
            ids = self.task_ids.to(device, non_blocking=True)
            self._ids_on[device] = ids
        return ids

    def row_ids_on(self, device: torch.device, method: str) -> torch.Tensor:
        """`ids_on` for layers that take one task per row: per-token ids are a clear error."""
        if self.task_ids.dim() != 1:
            raise RuntimeError(
                f"{method} takes one task id per row (shape (batch,)), not one per token "
                f"(shape {tuple(self.task_ids.shape)}); pack its rows by task"
            )
        return self.ids_on(device)

    def __len__(self) -> int:
        return int(self.task_ids.shape[0])


def _as_ids(task_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = task_ids if isinstance(task_ids, torch.Tensor) else torch.tensor(list(task_ids), dtype=torch.long)
    if ids.dim() not in (1, 2):
        raise ValueError(f"task_ids must have shape (batch,) or (batch, tokens), got {tuple(ids.shape)}")
    if ids.dtype != torch.long:
        if ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"task_ids must be integer ids, got dtype {ids.dtype}")
        ids = ids.long()
    return ids


@contextmanager
def task_context(task_ids: torch.Tensor | Sequence[int]) -> Iterator[TaskContext]:
    """Make `task_ids` visible to task-gated layers inside the block: one id per row of the batch
    (batch,), or one per token (batch, tokens) for packed sequences that mix tasks (moe_lora and
    cgc_lora take either; the layers that read one task per row refuse per-token ids).

    Contexts nest (the innermost wins) and are local to the thread / asyncio task that opens them.
    """
    ctx = TaskContext(_as_ids(task_ids))
    token = _CURRENT.set(ctx)
    entry = (threading.get_ident(), ctx)
    with _OPEN_LOCK:
        _OPEN.append(entry)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
        with _OPEN_LOCK:
            _OPEN.remove(entry)


def current_task_context() -> TaskContext | None:
    """The innermost open context of this thread; inside a backward on an autograd worker thread,
    the innermost context of the one thread that has contexts open."""
    ctx = _CURRENT.get()
    if ctx is not None:
        return ctx
    if not in_backward():
        return None  # not inside a backward: no fallback, the caller forgot the context
    with _OPEN_LOCK:
        open_now = list(_OPEN)
    if not open_now:
        return None
    if len({thread for thread, _ in open_now}) > 1:
        raise RuntimeError(
            "a task-gated layer ran inside a backward on an autograd worker thread while task contexts are open "
            "in several threads; run the backward of each batch in the thread that opened its context"
        )
    return open_now[-1][1]


def require_task_context() -> TaskContext:
    """`current_task_context()`, or a RuntimeError that says how to fix the call."""
    ctx = current_task_context()
    if ctx is None:
        raise RuntimeError(NO_CONTEXT_MESSAGE)
    return ctx


def rows_for(ids: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Spread per-row values (first dimension: the rows) over `n_rows` rows: rows may be repeated
    k times each (beams, a KV cache shared per label...), the way `repeat_interleave` / `generate`
    expand a batch."""
    n = ids.shape[0]
    if n == n_rows:
        return ids
    if n == 0 or n_rows % n != 0:
        raise RuntimeError(
            f"task_context holds {n} task ids but a task-gated layer received {n_rows} rows; "
            "the rows must be the batch, or each row repeated k times in place (beam search, num_return_sequences)"
        )
    return ids.repeat_interleave(n_rows // n, dim=0)
