"""The task-gated expert layer: all experts stacked, two matmuls whatever their number.

For a frozen linear W0 and a row of task t:  h = W0 x + (alpha / r) * sum_e g_t[e] * B_e A_e x.

The experts are stored stacked: one A of shape (R, d_in) and one B of shape (d_out, R), R the
total rank (expert e owns a contiguous block of rank slots). Because the gate depends only on
the task, the sum over experts is a per-row scaling of the rank dimension:

    delta = ((x @ A.T) * s[row]) @ B.T,   s_t[slot] = (alpha / r) * g_t[expert of slot]

so the cost is that of one LoRA of rank R, independent of the number of experts, and a batch
mixing tasks costs nothing extra. Experts outside a task's gate get s = 0 (cgc_lora).

The per-row scales s are computed once per forward (`GateRouter.store_scales`, called by a forward
pre-hook on the model) and read by every layer from the task context. Layers with their own gate
(gate="per_layer"), layers called outside the model's forward, and layers inside a *reentrant*
gradient checkpoint compute them themselves: a tensor shared between checkpointed segments
would be backpropagated once per segment by reentrant checkpointing, which autograd forbids.
Non-reentrant checkpointing (the transformers default) recomputes a segment with the same cached
tensor and the same ops, as it requires.

The task ids may also be given per token, (B, T): s becomes (B, T, R), so a packed sequence can
hold rows of several tasks and training packs all of a step's rows as plain LoRA does (the study's
cgc_lora steps had 22% padding cells when packed by task).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from multitune._compat import in_out_features, tensor_version
from multitune.errors import MultituneError
from multitune.methods.dropout import drop_unscaled
from multitune.methods.experts.config import ExpertLayout, ExpertsConfig
from multitune.methods.lora.layer import plain_inputs
from multitune.methods.task_context import TaskContext, require_task_context, rows_for
from multitune.methods.task_lora import lora_delta


class GateRouter:
    """The gate of one adapter: task embedding -> softmax over the allowed experts -> rank scales.

    Not an nn.Module: its parameters live on the tuner (shared gate) or on each layer (per-layer
    projection); every layer holds a reference to the router of its adapter.
    """

    def __init__(self, config: ExpertsConfig, layout: ExpertLayout, embedding: nn.Embedding, proj: nn.Linear | None):
        self.layout = layout
        self.scaling = config.alpha / config.rank
        self.embedding = embedding
        self.proj = proj  # None: each layer has its own projection
        self._allowed = torch.tensor(layout.allowed, dtype=torch.bool)  # (G, E)
        self._slot_expert = torch.tensor(layout.slot_expert, dtype=torch.long)  # (R,)
        # what the gate weights of a row sum to (see ExpertsConfig.gate_norm)
        count = self._allowed.sum(1).float() if config.gate_norm == "count" else torch.ones(len(self._allowed))
        self._gain = count.unsqueeze(1)  # (G, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (self._allowed.to(device), self._slot_expert.to(device), self._gain.to(device))
        return self._on[device]

    def gates(self, proj: nn.Linear | None = None) -> torch.Tensor:
        """(G, E) gate weights of every gate row: a softmax over the row's allowed experts, 0 elsewhere."""
        proj = proj if proj is not None else self.proj
        emb = self.embedding.weight
        allowed, _, _ = self._constants(emb.device)
        learned = F.linear(emb, proj.weight.to(emb.dtype)).float()  # (T, E)
        fixed = learned.new_zeros(allowed.shape[0] - learned.shape[0], learned.shape[1])  # reserved rows: uniform
        logits = torch.cat([learned, fixed]).masked_fill(~allowed, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def weights(self, proj: nn.Linear | None = None) -> torch.Tensor:
        """(G, E) what each expert's output is multiplied by (before alpha / r): the gates, times
        the number of a row's experts with gate_norm "count"."""
        gates = self.gates(proj)
        return gates * self._constants(gates.device)[2]

    def scale_table(self, proj: nn.Linear | None = None) -> torch.Tensor:
        """(G, R): the rank-slot scales of every gate row, alpha / r folded in."""
        weights = self.weights(proj)
        _, slot_expert, _ = self._constants(weights.device)
        return weights.index_select(1, slot_expert) * self.scaling

    def row_scales(self, ids: torch.Tensor, proj: nn.Linear | None = None) -> torch.Tensor:
        """(B, R) the scales of each row of a batch with task ids `ids` (B,), or (B, T, R) of
        each token with ids (B, T) (packed sequences that mix tasks)."""
        return F.embedding(ids, self.scale_table(proj))

    def check_ids(self, ctx: TaskContext) -> None:
        """A clear error for an out-of-range id, once per context (ids given on the GPU are not
        checked: that would wait for the device at every forward)."""
        ids = ctx.task_ids
        if ids.device.type != "cpu" or ctx.cache.get(("checked", self)) or not ids.numel():
            return
        if int(ids.min()) < 0 or int(ids.max()) >= len(self._allowed):
            raise MultituneError(
                f"task id out of range: the gate has rows 0..{len(self._allowed) - 1} "
                f"({', '.join(self.layout.gate_names)}); map task names to ids with task_id()"
            )
        ctx.cache[("checked", self)] = True

    def _gate_version(self) -> tuple[int, ...]:
        # optimizer steps modify the parameters in place, which bumps their version: a stale cache is never used
        return (tensor_version(self.embedding.weight), tensor_version(self.proj.weight))

    def store_scales(self, ctx: TaskContext) -> None:
        """Compute this batch's scales once for every layer of the forward (shared gate only)."""
        self.check_ids(ctx)
        if self.proj is None:
            return
        scales = self.row_scales(ctx.ids_on(self.embedding.weight.device))
        ctx.cache[self] = (self._gate_version(), scales)

    def cached_scales(self, ctx: TaskContext) -> torch.Tensor | None:
        entry = ctx.cache.get(self)
        if entry is None or entry[0] != self._gate_version():
            return None
        return entry[1]


class ExpertsLinear(nn.Module, BaseTunerLayer):
    """A frozen linear (nn.Linear or GPT-2's Conv1D) plus task-gated stacked LoRA experts.

    Subclasses set `prefix`; the adapter containers are named `<prefix>A`, `<prefix>B`,
    `<prefix>gate` (per-layer gate projections) and `<prefix>dropout`, as PEFT expects.
    """

    prefix = "experts_"
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("rank", "scaling", "routers")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ExpertsConfig, router: GateRouter) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        for suffix in ("A", "B", "gate", "dropout"):
            setattr(self, self.prefix + suffix, nn.ModuleDict())
        self.rank: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.routers: dict[str, GateRouter] = {}  # plain dict: the shared gate must not be registered twice
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.is_conv1d = isinstance(self.get_base_layer(), Conv1D)
        self.in_features, self.out_features = in_out_features(self.get_base_layer())
        if self.in_features is None:
            kind = type(base_layer).__name__
            raise MultituneError(f"task-gated experts support Linear and Conv1D layers, not {kind}")
        self.update_layer(adapter_name, config, router)

    # the containers, by role (their attribute names carry the method's prefix)
    @property
    def experts_A(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "A")

    @property
    def experts_B(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "B")

    @property
    def experts_gate(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "gate")

    @property
    def experts_dropout(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "dropout")

    def update_layer(self, adapter_name: str, config: ExpertsConfig, router: GateRouter) -> None:
        layout = router.layout
        weight = self.get_base_layer().weight
        # adapters train in float32 even on a half-precision base, as PEFT's LoRA does
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        a = nn.Linear(self.in_features, layout.total_rank, bias=False, device=weight.device, dtype=dtype)
        b = nn.Linear(layout.total_rank, self.out_features, bias=False, device=weight.device, dtype=dtype)
        # as LoRA: A random (every expert block alike), B = 0, so the model starts exactly at the base model
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.experts_A[adapter_name] = a
        self.experts_B[adapter_name] = b
        self.experts_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if router.proj is None:
            gate = nn.Linear(config.task_embedding_dim, layout.n_experts, bias=False, device=weight.device)
            nn.init.zeros_(gate.weight)  # uniform gates at the start: no expert is favoured before training
            self.experts_gate[adapter_name] = gate
        self.rank[adapter_name] = layout.total_rank
        self.scaling[adapter_name] = config.alpha / config.rank
        self.routers[adapter_name] = router
        self.set_adapter(self.active_adapters)  # trainable if active, frozen otherwise

    def own_gate(self, adapter_name: str) -> nn.Linear | None:
        return self.experts_gate[adapter_name] if adapter_name in self.experts_gate else None

    def row_scales(self, adapter_name: str, n_rows: int, device: torch.device) -> torch.Tensor:
        """(n_rows, R) scales of this layer's input rows, from the task context."""
        ctx = require_task_context()
        router = self.routers[adapter_name]
        own = self.own_gate(adapter_name)
        scales = None
        if own is None and not ctx.recompute_per_layer:
            scales = router.cached_scales(ctx)
            if scales is not None and scales.requires_grad and not torch.is_grad_enabled():
                ctx.recompute_per_layer = True  # a reentrant checkpoint: see the module docstring
        if scales is None:
            router.check_ids(ctx)
            scales = router.row_scales(ctx.ids_on(router.embedding.weight.device), own)
        return rows_for(scales, n_rows).to(device)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if self._fusable(x, args, kwargs):
            return self._fused_forward(x)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.experts_A:
                continue
            a, b = self.experts_A[name], self.experts_B[name]
            scales = self.row_scales(name, x.shape[0], x.device).to(a.weight.dtype)
            h = a(self.experts_dropout[name](x.to(a.weight.dtype)))  # (n, ..., R)
            h = h * _spread(scales, h)
            result = result + b(h).to(out_dtype)
        return result

    def _fusable(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """One active adapter, plain dtypes, a plain base layer: `_fused_forward` applies."""
        if args or kwargs or len(self.active_adapters) != 1 or self.active_adapters[0] not in self.experts_A:
            return False
        name = self.active_adapters[0]
        return plain_inputs(x, self.get_base_layer(), self.experts_A[name].weight, self.experts_B[name].weight)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward above with the B product accumulated into the base output by the GEMM and
        the dropout scale folded into the row scales (see methods/lora/layer.py: on a CPU the
        element-wise passes this saves cost more than the thin rank-R GEMM)."""
        name = self.active_adapters[0]
        a, b = self.experts_A[name], self.experts_B[name]
        shape = x.shape
        scales = self.row_scales(name, shape[0], x.device).to(x.dtype)
        result = self.base_layer(x.reshape(-1, shape[-1]))  # 2-D and fresh: added into in place
        dropped, keep_scale = drop_unscaled(self.experts_dropout[name], x)
        h = a(dropped)
        h = h * _spread(scales * keep_scale, h)
        result.addmm_(h.reshape(-1, h.shape[-1]), b.weight.t())
        return result.view(*shape[:-1], result.shape[-1])

    def task_factors(self, adapter_name: str, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t, B_t) of gate row `row` as an ordinary LoRA: delta_t = (alpha / r) * B_t @ A_t.

        Only the experts in the row's gate matter: A_t is their rows of A, B_t their columns of B
        with the gate weights folded in.
        """
        router = self.routers[adapter_name]
        with torch.no_grad():
            gates = router.weights(self.own_gate(adapter_name))[row]  # (E,)
            slots = torch.tensor(router.layout.slots(row), dtype=torch.long, device=gates.device)
            g = gates.index_select(0, router._constants(gates.device)[1].index_select(0, slots))
            a = self.experts_A[adapter_name].weight
            b = self.experts_B[adapter_name].weight
            slots = slots.to(a.device)
            a_t = a.index_select(0, slots).clone()
            b_t = b.index_select(1, slots) * g.to(b.device, b.dtype)
        return a_t, b_t

    def task_delta(self, adapter_name: str, row: int) -> torch.Tensor:
        """The weight update of gate row `row`, shaped like the base weight (Conv1D: (in, out))."""
        return lora_delta(*self.task_factors(adapter_name, row), self.scaling[adapter_name], self.is_conv1d)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise MultituneError(
            "task-gated experts depend on the task of each row and cannot be merged into the base weights; "
            "use multitune.methods.experts.export.merge_task(model, task)"
        )

    def unmerge(self) -> None:
        pass  # never merged


def _spread(scales: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Row scales (n, R) viewed to multiply h (n, ..., R); token scales (n, T, R) as they are."""
    if scales.dim() == 2:
        return scales.view(scales.shape[0], *([1] * (h.dim() - 2)), scales.shape[1])
    if scales.shape[:-1] != h.shape[:-1]:
        raise RuntimeError(
            f"task_context holds task ids of shape {tuple(scales.shape[:-1])} (one per token) but a "
            f"task-gated layer received tokens of shape {tuple(h.shape[:-1])}"
        )
    return scales


class MoeLoraLinear(ExpertsLinear):
    prefix = "moe_lora_"
    adapter_layer_names = ("moe_lora_A", "moe_lora_B", "moe_lora_gate")
    other_param_names = ("rank", "scaling", "routers", "moe_lora_dropout")


class CgcLoraLinear(ExpertsLinear):
    prefix = "cgc_lora_"
    adapter_layer_names = ("cgc_lora_A", "cgc_lora_B", "cgc_lora_gate")
    other_param_names = ("rank", "scaling", "routers", "cgc_lora_dropout")
