"""The shared-factor expert layer: one LoRA factor shared by every task, the other split into
experts each task mixes with its own weights; two matmuls whatever the number of experts.

Experts are stored stacked: with a shared A (r, d_in) the up-projections are one B of shape
(d_out, n r), expert i in columns [i r, (i + 1) r); with a shared B (d_out, r) the
down-projections are one A of shape (n r, d_in). Because each row's weights depend only on its
task, the mix is a per-row scaling between the two matmuls:

    share A:  h = Lambda_t (A x)          u = [w_t,1 h; ...; w_t,n h]     delta = B u
    share B:  h = A x = [h_1, ..., h_n]   u = sum_i w_t,i h_i            delta = B u

(Lambda_t = identity unless mtl_lora), so a step costs one LoRA of rank n r on one side and r on
the other, and a batch mixing tasks costs nothing extra. The reference code of MTL-LoRA instead
builds each row's mixed B_t (d_out x r per row) and multiplies by it with a batched matmul; the
stacked form gives the same sum without a per-row copy of B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from multitune._compat import in_out_features
from multitune.errors import MultituneError
from multitune.methods.dropout import drop_unscaled
from multitune.methods.lora.layer import plain_inputs
from multitune.methods.shared_factor.config import SharedFactorConfig
from multitune.methods.task_context import TaskContext, require_task_context, rows_for
from multitune.methods.task_lora import lora_delta


class SharedFactorLinear(nn.Module, BaseTunerLayer):
    """A frozen linear (nn.Linear or GPT-2's Conv1D) plus shared-factor task experts.

    Subclasses set `prefix`; the containers are `<prefix>A`, `<prefix>B`, `<prefix>gate` (the
    per-task logits z, (tasks, n)), `<prefix>transform` (mtl_lora's Lambda, (tasks, r, r)) and
    `<prefix>dropout`, as PEFT expects.
    """

    prefix = "shared_factor_"
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("rank", "scaling", "configs")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SharedFactorConfig) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        for suffix in ("A", "B", "dropout"):
            setattr(self, self.prefix + suffix, nn.ModuleDict())
        for suffix in ("gate", "transform"):
            setattr(self, self.prefix + suffix, nn.ParameterDict())
        self.rank: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.configs: dict[str, SharedFactorConfig] = {}
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.is_conv1d = isinstance(self.get_base_layer(), Conv1D)
        self.in_features, self.out_features = in_out_features(self.get_base_layer())
        if self.in_features is None:
            kind = type(base_layer).__name__
            raise MultituneError(f"shared-factor experts support Linear and Conv1D layers, not {kind}")
        self.update_layer(adapter_name, config)

    def _part(self, suffix: str) -> nn.ModuleDict | nn.ParameterDict:
        return getattr(self, self.prefix + suffix)

    def update_layer(self, adapter_name: str, config: SharedFactorConfig) -> None:
        r, n, tasks = config.expert_rank(), config.n_experts, len(config.task_names)
        weight = self.get_base_layer().weight
        # adapters train in float32 even on a half-precision base, as PEFT's LoRA does
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        a_rows, b_cols = (r, n * r) if config.share == "A" else (n * r, r)
        a = nn.Linear(self.in_features, a_rows, bias=False, device=weight.device, dtype=dtype)
        b = nn.Linear(b_cols, self.out_features, bias=False, device=weight.device, dtype=dtype)
        # as LoRA: A random (every expert alike), B = 0, so the model starts exactly at the base model
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        # random task logits, as both papers' code: with equal weights and a shared A, the B_i would
        # get equal gradients and stay equal for ever
        gate = torch.empty(tasks, n, device=weight.device, dtype=dtype)
        nn.init.kaiming_uniform_(gate, a=math.sqrt(5))
        self._part("A")[adapter_name] = a
        self._part("B")[adapter_name] = b
        self._part("gate")[adapter_name] = nn.Parameter(gate)
        if config.transform:  # Lambda_t = identity at the start, as MTL-LoRA's code
            eye = torch.eye(r, device=weight.device, dtype=dtype)
            self._part("transform")[adapter_name] = nn.Parameter(eye.repeat(tasks, 1, 1))
        self._part("dropout")[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.rank[adapter_name] = r
        self.scaling[adapter_name] = config.alpha / r
        self.configs[adapter_name] = config
        self.set_adapter(self.active_adapters)  # trainable if active, frozen otherwise

    # --- the per-task tables: one row per task, then the "common" fallback row -------------------

    def weights(self, adapter_name: str) -> torch.Tensor:
        """(tasks + 1, n): softmax(z_t / temperature) of every task, then uniform weights."""
        z = self._part("gate")[adapter_name]
        learned = F.softmax(z.float() / self.configs[adapter_name].temperature, dim=-1).to(z.dtype)
        uniform = learned.new_full((1, z.shape[1]), 1.0 / z.shape[1])
        return torch.cat([learned, uniform])

    def transforms(self, adapter_name: str) -> torch.Tensor | None:
        """(tasks + 1, r, r): Lambda_t of every task, then the identity; None without a transform."""
        if adapter_name not in self._part("transform"):
            return None
        lam = self._part("transform")[adapter_name]
        eye = torch.eye(lam.shape[-1], device=lam.device, dtype=lam.dtype).unsqueeze(0)
        return torch.cat([lam, eye])

    def _row_ids(self, adapter_name: str, ctx: TaskContext, n_rows: int, device: torch.device) -> torch.Tensor:
        ids = ctx.task_ids
        rows = len(self.configs[adapter_name].gate_names)
        key = ("checked", rows)
        if ids.device.type == "cpu" and ids.numel() and not ctx.cache.get(key):
            if int(ids.min()) < 0 or int(ids.max()) >= rows:
                names = ", ".join(self.configs[adapter_name].gate_names)
                raise MultituneError(
                    f"task id out of range: the model has rows 0..{rows - 1} ({names}); "
                    "map task names to ids with task_id()"
                )
            ctx.cache[key] = True
        return rows_for(ctx.row_ids_on(device, self.prefix.rstrip("_")), n_rows)

    # --- forward -----------------------------------------------------------------------------------

    def _mixed(self, adapter_name: str, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """u of the module docstring from h = A x (rows, ..., A's rows), for rows of tasks `ids`."""
        cfg = self.configs[adapter_name]
        rows, n, r = h.shape[0], cfg.n_experts, self.rank[adapter_name]
        table = self.weights(adapter_name)  # (G, n)
        lam = self.transforms(adapter_name)
        if lam is not None:
            # u_row = M_t h_row with M_t = [w_t,1 Lambda_t; ...; w_t,n Lambda_t] (n r x r): the
            # transform and the mix in one batched matmul, with no element-wise pass over u
            m = (table[:, :, None, None] * lam[:, None]).reshape(-1, n * r, r).index_select(0, ids).to(h.dtype)
            return torch.bmm(h.reshape(rows, -1, r), m.transpose(1, 2)).view(*h.shape[:-1], n * r)
        w = table.index_select(0, ids).to(h.dtype).view(rows, *([1] * (h.dim() - 2)), n, 1)
        if cfg.share == "B":
            return (h.unflatten(-1, (n, r)) * w).sum(-2)
        return (h.unsqueeze(-2) * w).flatten(-2)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        active = [n for n in self.active_adapters if n in self._part("A")]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        ctx = require_task_context()
        a0, b0 = self._part("A")[active[0]].weight, self._part("B")[active[0]].weight
        if len(active) == 1 and not args and not kwargs and plain_inputs(x, self.get_base_layer(), a0, b0):
            return self._fused_forward(x, active[0], ctx)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in active:
            a, b = self._part("A")[name], self._part("B")[name]
            ids = self._row_ids(name, ctx, x.shape[0], a.weight.device)
            h = a(self._part("dropout")[name](x.to(a.weight.dtype)))
            result = result + (b(self._mixed(name, h, ids)) * self.scaling[name]).to(out_dtype)
        return result

    def _fused_forward(self, x: torch.Tensor, name: str, ctx: TaskContext) -> torch.Tensor:
        """The forward above with the B product accumulated into the base output by the GEMM and
        the dropout and LoRA scales in its alpha (see methods/lora/layer.py)."""
        a, b = self._part("A")[name], self._part("B")[name]
        shape = x.shape
        ids = self._row_ids(name, ctx, shape[0], x.device)
        result = self.base_layer(x.reshape(-1, shape[-1]))  # 2-D and fresh: added into in place
        dropped, keep_scale = drop_unscaled(self._part("dropout")[name], x)
        u = self._mixed(name, a(dropped), ids)
        result.addmm_(u.reshape(-1, u.shape[-1]), b.weight.t(), alpha=self.scaling[name] * keep_scale)
        return result.view(*shape[:-1], result.shape[-1])

    # --- one task as a plain LoRA --------------------------------------------------------------------

    def task_factors(self, adapter_name: str, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t, B_t) of gate row `row`: delta_t = (alpha / r) * B_t @ A_t, a rank-r LoRA.

        share A: A_t = Lambda_t A, B_t = sum_i w_t,i B_i; share B: A_t = sum_i w_t,i A_i, B_t = B."""
        cfg = self.configs[adapter_name]
        n, r = cfg.n_experts, self.rank[adapter_name]
        with torch.no_grad():
            w = self.weights(adapter_name)[row]
            a = self._part("A")[adapter_name].weight
            b = self._part("B")[adapter_name].weight
            if cfg.share == "B":
                return (a.view(n, r, -1) * w.view(n, 1, 1).to(a.dtype)).sum(0), b.clone()
            lam = self.transforms(adapter_name)
            a_t = lam[row].to(a.dtype) @ a if lam is not None else a.clone()
            b_t = (b.view(b.shape[0], n, r) * w.view(1, n, 1).to(b.dtype)).sum(1)
        return a_t, b_t

    def task_delta(self, adapter_name: str, row: int) -> torch.Tensor:
        """The weight update of gate row `row`, shaped like the base weight (Conv1D: (in, out))."""
        return lora_delta(*self.task_factors(adapter_name, row), self.scaling[adapter_name], self.is_conv1d)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise MultituneError(
            "shared-factor experts depend on the task of each row and cannot be merged into the base weights; "
            "use multitune.methods.shared_factor.merge_task(model, task)"
        )

    def unmerge(self) -> None:
        pass  # never merged


class LoraExpertsLinear(SharedFactorLinear):
    prefix = "lora_experts_"
    adapter_layer_names = ("lora_experts_A", "lora_experts_B", "lora_experts_gate", "lora_experts_transform")
    other_param_names = ("rank", "scaling", "configs", "lora_experts_dropout")


class MtlLoraLinear(SharedFactorLinear):
    prefix = "mtl_lora_"
    adapter_layer_names = ("mtl_lora_A", "mtl_lora_B", "mtl_lora_gate", "mtl_lora_transform")
    other_param_names = ("rank", "scaling", "configs", "mtl_lora_dropout")
