"""Configs of the shared-factor task experts: one LoRA factor shared by every task, the other
split into experts that each task mixes with its own learned weights.

Three methods, one layer (layer.py):

- ``lora_experts`` with ``share: A`` (HydraLoRA, Tian et al., NeurIPS 2024, its router replaced by
  the task id): one down-projection A, `experts` up-projections B_i;
  delta_t = (alpha / r) * (sum_i w_t,i B_i) A.
- ``lora_experts`` with ``share: B`` (the mirror image, as ALoRA reports): `experts`
  down-projections A_i, one up-projection B; delta_t = (alpha / r) * B (sum_i w_t,i A_i).
- ``mtl_lora`` (MTL-LoRA, Yang et al., AAAI 2025): shared A, a task transform Lambda_t (r x r)
  after it, `up_projections` B_i; delta_t = (alpha / r) * (sum_i w_t,i B_i) Lambda_t A.

w_t = softmax(z_t / temperature), z_t a learned vector per task and layer (the reference code of
both papers: one weight table per layer). Every task's update is one fixed rank-r LoRA, so it
exports to plain PEFT and multi-LoRA servers.

**Rank budget.** ``lora_experts`` counts as the other experts do: ``rank`` is the budget of one
plain LoRA, the experts split it (r = rank / experts each, so the expert side holds exactly the
parameters of that LoRA's factor) and the shared factor has the rank of one expert; rank must
divide by experts, since every expert multiplies the same shared factor. ``mtl_lora`` follows its
paper: ``rank`` is r, the rank of A and of every B_i. Both scale by alpha / r, r the rank of the
task's update, as the papers' code does.

**Gate rows.** Row i < len(task_names) is task_names[i]; one more row, ``common``, is the fallback
for a task the model was not trained on: uniform weights and (mtl_lora) Lambda = identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType, TaskType

from multitune._compat import extend_peft_type
from multitune.errors import MultituneError
from multitune.methods.task_lora import active_config

COMMON = "common"

LORA_EXPERTS: PeftType = extend_peft_type("LORA_EXPERTS")
MTL_LORA: PeftType = extend_peft_type("MTL_LORA")


@dataclass
class SharedFactorConfig(PeftConfig):
    """Fields shared by lora_experts and mtl_lora (see the module docstring)."""

    rank: int = field(default=16, metadata={"help": "rank budget (lora_experts) or r (mtl_lora)"})
    alpha: float = field(default=32.0, metadata={"help": "the update is scaled by alpha / r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the input of A"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "module names, or 'all-linear'"})
    exclude_modules: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)
    task_names: list[str] = field(default_factory=list, metadata={"help": "gate row i is task_names[i]"})
    temperature: float = field(default=1.0, metadata={"help": "w_t = softmax(z_t / temperature)"})

    method_name = "shared_factor"
    transform: ClassVar[bool] = False  # a task transform Lambda_t after A (mtl_lora)

    def __post_init__(self) -> None:
        if self.task_type is None:
            self.task_type = TaskType.CAUSAL_LM
        super().__post_init__()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        name = self.method_name
        if self.rank < 1:
            raise MultituneError(f"{name}: rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise MultituneError(f"{name}: dropout must be in [0, 1), got {self.dropout}")
        if not self.temperature > 0:
            raise MultituneError(f"{name}: temperature must be > 0, got {self.temperature}")
        self.task_names = list(self.task_names)
        if not self.task_names:
            raise MultituneError(f"{name}: task_names is empty: the task weights need the list of tasks")
        dupes = sorted({t for t in self.task_names if self.task_names.count(t) > 1})
        if dupes:
            raise MultituneError(f"{name}: task names repeat: {', '.join(dupes)}")
        if COMMON in self.task_names:
            raise MultituneError(f"{name}: '{COMMON}' is reserved for the fallback of unknown tasks")
        self.expert_rank()  # fail now, before any model is touched

    @property
    def n_experts(self) -> int:
        raise TypeError(f"{type(self).__name__} is the shared base: use LoraExpertsConfig or MtlLoraConfig")

    def expert_rank(self) -> int:
        """r: the rank of the shared factor, of every expert and of every task's update."""
        raise TypeError(f"{type(self).__name__} is the shared base: use LoraExpertsConfig or MtlLoraConfig")

    @property
    def gate_names(self) -> list[str]:
        return [*self.task_names, COMMON]

    def describe(self) -> str:
        r, n = self.expert_rank(), self.n_experts
        shared, split = ("A", "B") if self.share == "A" else ("B", "A")
        extra = f", a task transform Lambda_t ({r}x{r}) per task" if self.transform else ""
        return (
            f"{self.method_name}: shared {shared} of rank {r}, {n} experts {split}_i of rank {r}{extra}; "
            f"every task's update is a rank-{r} LoRA, scaled by alpha / {r}"
        )


@dataclass
class LoraExpertsConfig(SharedFactorConfig):
    """HydraLoRA (share A) or its mirror (share B), with task-id weights over the experts."""

    share: Literal["A", "B"] = field(default="A", metadata={"help": "the factor every task shares"})
    experts: int = field(default=4, metadata={"help": "experts of the other factor; they split the rank"})

    method_name = "lora_experts"

    def __post_init__(self) -> None:
        self.peft_type = LORA_EXPERTS
        if self.share not in ("A", "B"):
            raise MultituneError(f"lora_experts: share must be 'A' or 'B', got '{self.share}'")
        super().__post_init__()

    @property
    def n_experts(self) -> int:
        return self.experts

    def expert_rank(self) -> int:
        if self.experts < 1:
            raise MultituneError(f"lora_experts: experts must be >= 1, got {self.experts}")
        if self.rank % self.experts:
            low = self.rank - self.rank % self.experts
            options = f"rank {low} or {low + self.experts}" if low else f"rank {self.experts}"
            raise MultituneError(
                f"lora_experts: rank {self.rank} does not split evenly over {self.experts} experts (each "
                f"multiplies the same shared factor, so all need one rank); use {options}"
            )
        return self.rank // self.experts


@dataclass
class MtlLoraConfig(SharedFactorConfig):
    """MTL-LoRA: shared A, a task transform Lambda_t, `up_projections` B_i mixed per task."""

    rank: int = field(default=8, metadata={"help": "r: the rank of A and of every B_i"})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha / r"})
    up_projections: int = field(default=3, metadata={"help": "n: the number of up-projections B_i"})
    temperature: float = field(default=0.1, metadata={"help": "w_t = softmax(z_t / temperature) (paper: 0.1)"})

    method_name = "mtl_lora"
    share: ClassVar[str] = "A"
    transform: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.peft_type = MTL_LORA
        super().__post_init__()

    @property
    def n_experts(self) -> int:
        return self.up_projections

    def expert_rank(self) -> int:
        if self.up_projections < 1:
            raise MultituneError(f"mtl_lora: up_projections must be >= 1, got {self.up_projections}")
        return self.rank


def shared_factor_config(model_or_config: Any) -> SharedFactorConfig:
    """The (active) lora_experts / mtl_lora config of a PeftModel, a tuner, or the config itself."""
    return active_config(model_or_config, SharedFactorConfig, "lora_experts / mtl_lora")


def task_id(model_or_config: Any, name: str, fallback: str | None = None) -> int:
    """The gate row of task `name`; an unknown task raises, unless `fallback` is "common" (uniform
    weights, no task transform) or a known task."""
    cfg = shared_factor_config(model_or_config)
    if name in cfg.task_names:
        return cfg.task_names.index(name)
    if fallback is None:
        raise MultituneError(f"unknown task '{name}'; the model knows: {', '.join(cfg.task_names)}")
    if fallback in cfg.gate_names:
        return cfg.gate_names.index(fallback)
    raise MultituneError(
        f"unknown task '{name}' and unknown fallback '{fallback}'; fallbacks: {COMMON}, or a known task"
    )


def gate_row(model_or_config: Any, name: str) -> int:
    """The gate row of a task or of "common"."""
    cfg = shared_factor_config(model_or_config)
    if name in cfg.gate_names:
        return cfg.gate_names.index(name)
    return task_id(cfg, name)  # raises the one-line error
