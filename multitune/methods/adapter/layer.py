"""The bottleneck-adapter tuner layer: wraps one sub-block of a decoder layer (its attention or its MLP).

Wrapping the sub-block, rather than patching the decoder layer's forward, is what keeps any Hugging
Face decoder working unchanged: the layer calls ``self.mlp(h)`` / ``self.self_attn(...)`` as before and
gets the sub-block's output with the adapter applied (see config.py for where each style reads and
adds). As a PEFT tuner layer (`BaseTunerLayer`) it is saved, loaded, enabled, disabled and unloaded by
PEFT like a LoRA layer.

With several adapters per place (one per task or per cluster) the weights are stacked, shape
(slots, out, in), and each row of the batch picks its slot from the task context: one batched matmul
per projection, whatever the mix of tasks in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from multitune.errors import MultituneError
from multitune.methods.adapter.config import MERGE_ERROR, AdapterConfig
from multitune.methods.task_context import TaskContext, require_task_context, rows_for

ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class StackedLinear(nn.Module):
    """`slots` affine maps in_features -> out_features; each row of a batch may use a different one."""

    def __init__(self, slots: int, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.slots, self.in_features, self.out_features = slots, in_features, out_features
        self.weight = nn.Parameter(torch.empty(slots, out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(slots, out_features, device=device, dtype=dtype))

    def reset_random(self) -> None:
        """As nn.Linear initialises its weight (each slot on its own); bias 0."""
        with torch.no_grad():
            for w in self.weight:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            self.bias.zero_()

    def reset_zero(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()

    def forward(self, x: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, ..., in). `slots`: (batch,) slot of each row; None (or one slot): slot 0 for all."""
        if slots is None or self.slots == 1:
            return F.linear(x, self.weight[0], self.bias[0])
        n = x.shape[0]
        flat = x.reshape(n, -1, self.in_features)  # (B, T, in)
        w = self.weight.index_select(0, slots)  # (B, out, in)
        b = self.bias.index_select(0, slots).unsqueeze(1)  # (B, 1, out)
        return torch.baddbmm(b, flat, w.transpose(1, 2)).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"slots={self.slots}, in_features={self.in_features}, out_features={self.out_features}"


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """A decoder sub-block (attention or MLP) plus bottleneck adapters on its output.

    `role` is "attn" or "mlp" (what the wrapped module is); the style of each adapter says whether
    it reads the sub-block's output (sequential) or its input (parallel).
    """

    adapter_layer_names: tuple[str, ...] = ("adapter_down", "adapter_up")
    other_param_names: tuple[str, ...] = ("adapter_dropout", "style", "activation", "bottleneck", "slot_table")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdapterConfig, role: str, hidden: int):
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.role = role
        self.hidden_size = hidden
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.style: dict[str, str] = {}
        self.activation: dict[str, str] = {}
        self.bottleneck: dict[str, int] = {}
        self.slot_table: dict[str, tuple[int, ...]] = {}
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.update_layer(adapter_name, config)

    def __getattr__(self, name: str) -> Any:
        """Attributes the decoder layer may read from its sub-block (layer_idx, sliding window...)
        resolve on the wrapped module, so wrapping changes nothing the model code sees."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or name.startswith("_"):
                raise
            return getattr(self.base_layer, name)

    def _param_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.get_base_layer().parameters(), None)
        if p is None:
            return torch.device("cpu"), torch.float32
        # adapters train in float32 even on a half-precision base, as PEFT's LoRA does
        return p.device, torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype

    def update_layer(self, adapter_name: str, config: AdapterConfig) -> None:
        device, dtype = self._param_device_dtype()
        d, m, k = self.hidden_size, config.bottleneck_size(self.hidden_size), config.n_slots
        down = StackedLinear(k, d, m, device=device, dtype=dtype)
        up = StackedLinear(k, m, d, device=device, dtype=dtype)
        down.reset_random()
        up.reset_zero()  # the adapter adds exactly 0 until it trains: the model starts at the base model
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.adapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.style[adapter_name] = config.style
        self.activation[adapter_name] = config.activation
        self.bottleneck[adapter_name] = m
        self.slot_table[adapter_name] = tuple(config.slot_table())
        self._tables = {}
        self.set_adapter(self.active_adapters)  # trainable if active, frozen otherwise

    def _row_slots(self, adapter_name: str, n_rows: int, device: torch.device) -> torch.Tensor:
        """(n_rows,) adapter slot of every row, from the task ids of the task context."""
        ctx = require_task_context()
        table = self._tables.get((adapter_name, device))
        if table is None:
            table = torch.tensor(self.slot_table[adapter_name], dtype=torch.long, device=device)
            self._tables[(adapter_name, device)] = table
        _check_ids(ctx, len(table))
        return rows_for(table.index_select(0, ctx.row_ids_on(device, "adapter")), n_rows)

    def adapt(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """up(dropout(act(down(x)))) with each row's own adapter: the change added to the sub-block's output."""
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        slots = self._row_slots(adapter_name, x.shape[0], x.device) if down.slots > 1 else None
        h = down(x.to(down.weight.dtype), slots)
        h = self.adapter_dropout[adapter_name](ACTIVATION_FNS[self.activation[adapter_name]](h))
        return up(h, slots)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        names = [n for n in self.active_adapters if n in self.adapter_down]
        if self.disable_adapters or not names:
            return out
        hidden = out[0] if isinstance(out, tuple) else out
        if not isinstance(hidden, torch.Tensor):
            raise MultituneError(
                f"adapter: {type(self.base_layer).__name__} returned {type(out).__name__}, not a tensor"
            )
        dtype = hidden.dtype
        for name in names:
            if self.style[name] == "parallel":
                source = args[0] if args else kwargs["hidden_states"]
            else:
                source = hidden  # sequential: adapters stack, each reading the output so far
            hidden = hidden + self.adapt(name, source).to(dtype)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise MultituneError(MERGE_ERROR)

    def unmerge(self) -> None:
        pass  # never merged


def _check_ids(ctx: TaskContext, n_tasks: int) -> None:
    """A clear error for a task id the adapters do not know, once per context (ids given on the GPU
    are not checked: that would wait for the device at every layer)."""
    ids = ctx.task_ids
    key = ("adapter-ids-checked", n_tasks)
    if ids.device.type != "cpu" or ctx.cache.get(key) or not ids.numel():
        return
    if int(ids.min()) < 0 or int(ids.max()) >= n_tasks:
        raise MultituneError(
            f"task id out of range: the per-task adapters know task ids 0..{n_tasks - 1} (the run's tasks, in order)"
        )
    ctx.cache[key] = True
