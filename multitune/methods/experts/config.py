"""Configs of the task-gated LoRA-expert methods and the expert layout each one implies.

Two PEFT methods share one layer: MOELoRA (``moe_lora``: E experts, all shared, every task has its
own softmax gate over them) and CGC-LoRA (``cgc_lora``: per cluster of tasks a few common experts,
plus a few experts specific to each task; the gate of a task ranges over its cluster's common
experts and its own experts only).

**Rank budget.** ``rank`` is the budget of one plain LoRA of that rank: the experts of a layer
split it, so A and B hold exactly as many parameters as that LoRA (the gate adds a few hundred).
Every expert gets ``rank // n_experts`` rank slots and the remainder ``rank % n_experts`` goes one
slot each to the first experts in this order: moe_lora: expert 0, 1, ...; cgc_lora: the common
experts round-robin over clusters (common 0 of every cluster, then common 1, ...), then the task
experts round-robin over tasks. Round-robin keeps the clusters and the tasks as even as possible;
each expert needs at least one slot, so ``rank >= n_experts``.

**Gate rows.** Row ``i < len(task_names)`` is task ``task_names[i]`` (learned). After them come
reserved rows that are not learned: a uniform gate over common experts, the fallback for a task
the model was not trained on (see `task_id`): ``common`` (moe_lora: all experts; cgc_lora: the
common experts of the default cluster if some task has no cluster, of the only cluster if there
is one, else of all clusters) and, for cgc_lora, ``common:<cluster>`` for every cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType, TaskType

from multitune._compat import extend_peft_type
from multitune.errors import MultituneError
from multitune.methods.task_lora import active_config

DEFAULT_CLUSTER = "default"
COMMON = "common"


MOE_LORA: PeftType = extend_peft_type("MOE_LORA")
CGC_LORA: PeftType = extend_peft_type("CGC_LORA")


def split_rank(rank: int, n_experts: int, order: list[int] | None = None) -> list[int]:
    """Ranks of `n_experts` experts summing to `rank`; the remainder goes to `order`'s first experts."""
    if n_experts < 1:
        raise MultituneError("a task-gated method needs at least one expert")
    if rank < n_experts:
        raise MultituneError(f"rank {rank} is too small for {n_experts} experts: each expert needs rank >= 1")
    ranks = [rank // n_experts] * n_experts
    for e in (order if order is not None else range(n_experts))[: rank % n_experts]:
        ranks[e] += 1
    return ranks


@dataclass(frozen=True)
class ExpertLayout:
    """Where each expert sits in the stacked rank dimension and which experts each gate row sees."""

    method: str
    expert_names: tuple[str, ...]
    expert_ranks: tuple[int, ...]
    gate_names: tuple[str, ...]  # the tasks, then the reserved fallback rows
    allowed: tuple[tuple[bool, ...], ...]  # allowed[row][expert]
    n_learned: int  # rows [0, n_learned) are the tasks' learned gates
    clusters: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (cluster, its tasks), cgc_lora only

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    @property
    def total_rank(self) -> int:
        return sum(self.expert_ranks)

    @property
    def slot_expert(self) -> list[int]:
        """The expert owning each of the `total_rank` stacked rank slots."""
        return [e for e, r in enumerate(self.expert_ranks) for _ in range(r)]

    def row(self, name: str) -> int:
        return self.gate_names.index(name)

    def slots(self, row: int) -> list[int]:
        """The rank slots of the experts in gate row `row` (the others get scale 0)."""
        return [i for i, e in enumerate(self.slot_expert) if self.allowed[row][e]]

    def row_rank(self, row: int) -> int:
        return sum(r for r, ok in zip(self.expert_ranks, self.allowed[row], strict=True) if ok)

    def describe(self) -> str:
        """One line per fact: the split of the rank budget over experts and tasks."""
        lines = [f"{self.method}: rank {self.total_rank} split over {self.n_experts} experts"]
        ranks = zip(self.expert_names, self.expert_ranks, strict=True)
        lines.append("  ranks per expert: " + ", ".join(f"{n}={r}" for n, r in ranks))
        per_task = []
        for row, name in enumerate(self.gate_names[: self.n_learned]):
            experts = [i for i, ok in enumerate(self.allowed[row]) if ok]
            per_task.append(f"{name}={self.row_rank(row)} ({len(experts)} experts)")
        lines.append("  rank per task: " + ", ".join(per_task))
        return "\n".join(lines)


@dataclass
class ExpertsConfig(PeftConfig):
    """Fields shared by moe_lora and cgc_lora (see the module docstring for the rank split)."""

    rank: int = field(default=16, metadata={"help": "total rank budget: as many A/B parameters as one LoRA of it"})
    alpha: float = field(default=32.0, metadata={"help": "the update is scaled by alpha / rank, as in LoRA"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the input of A"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "module names, or 'all-linear'"})
    exclude_modules: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)
    task_names: list[str] = field(default_factory=list, metadata={"help": "gate row i is task_names[i]"})
    gate: Literal["shared", "per_layer"] = field(
        default="shared", metadata={"help": "one gate for all layers, or one gate projection per layer"}
    )
    gate_norm: Literal["softmax", "count"] = field(
        default="softmax",
        metadata={
            "help": "softmax: a task's gate weights sum to 1 (MOELoRA, CGC-LoRA as published); count: they sum "
            "to the number of experts the task sees, so at uniform gates each expert moves the output as much "
            "as the same rank slots of a plain LoRA"
        },
    )
    task_embedding_dim: int = field(default=64)

    method_name = "experts"

    def __post_init__(self) -> None:
        if self.task_type is None:
            self.task_type = TaskType.CAUSAL_LM
        super().__post_init__()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if self.rank < 1:
            raise MultituneError(f"{self.method_name}: rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise MultituneError(f"{self.method_name}: dropout must be in [0, 1), got {self.dropout}")
        if self.gate not in ("shared", "per_layer"):
            raise MultituneError(f"{self.method_name}: gate must be 'shared' or 'per_layer', got '{self.gate}'")
        if self.gate_norm not in ("softmax", "count"):
            raise MultituneError(f"{self.method_name}: gate_norm must be 'softmax' or 'count', got '{self.gate_norm}'")
        if self.task_embedding_dim < 1:
            raise MultituneError(f"{self.method_name}: task_embedding_dim must be >= 1")
        self.task_names = list(self.task_names)
        if not self.task_names:
            raise MultituneError(f"{self.method_name}: task_names is empty: the gate needs the list of tasks")
        dupes = sorted({t for t in self.task_names if self.task_names.count(t) > 1})
        if dupes:
            raise MultituneError(f"{self.method_name}: task names repeat: {', '.join(dupes)}")
        reserved = [t for t in self.task_names if t == COMMON or t.startswith(COMMON + ":")]
        if reserved:
            raise MultituneError(f"{self.method_name}: '{reserved[0]}' is reserved for the common-experts fallback")
        self.layout()  # fail now, before any model is touched

    def layout(self) -> ExpertLayout:
        raise TypeError(f"{type(self).__name__} is the shared base: use MoeLoraConfig or CgcLoraConfig")


@dataclass
class MoeLoraConfig(ExpertsConfig):
    """MOELoRA: `experts` LoRA experts shared by all tasks; gate_t = softmax(W_g emb(t))."""

    experts: int = field(default=4, metadata={"help": "number of experts; they split the rank budget"})

    method_name = "moe_lora"

    def __post_init__(self) -> None:
        self.peft_type = MOE_LORA
        super().__post_init__()

    def layout(self) -> ExpertLayout:
        if self.experts < 1:
            raise MultituneError(f"moe_lora: experts must be >= 1, got {self.experts}")
        try:
            ranks = split_rank(self.rank, self.experts)
        except MultituneError as exc:
            raise MultituneError(f"moe_lora: {exc}; lower experts or raise rank") from None
        n = self.experts
        rows = [tuple([True] * n)] * (len(self.task_names) + 1)
        return ExpertLayout(
            method="moe_lora",
            expert_names=tuple(f"expert{i}" for i in range(n)),
            expert_ranks=tuple(ranks),
            gate_names=(*self.task_names, COMMON),
            allowed=tuple(rows),
            n_learned=len(self.task_names),
        )


@dataclass
class CgcLoraConfig(ExpertsConfig):
    """CGC-LoRA: per cluster `common_experts` shared experts, plus `task_experts` experts per task.

    Tasks missing from `clusters` (or mapped to None) form the cluster "default"; with no
    `clusters` at all every task is in it (N=1).
    """

    clusters: dict[str, str | None] | None = field(default=None, metadata={"help": "task -> cluster name"})
    common_experts: int = field(default=2, metadata={"help": "common experts per cluster"})
    task_experts: int = field(default=1, metadata={"help": "specific experts per task"})

    method_name = "cgc_lora"

    def __post_init__(self) -> None:
        self.peft_type = CGC_LORA
        super().__post_init__()

    def cluster_of(self) -> dict[str, str]:
        clusters = self.clusters or {}
        unknown = sorted(set(clusters) - set(self.task_names))
        if unknown:
            raise MultituneError(f"cgc_lora: clusters name unknown tasks: {', '.join(unknown)}")
        return {t: clusters.get(t) or DEFAULT_CLUSTER for t in self.task_names}

    def layout(self) -> ExpertLayout:
        if self.common_experts < 0 or self.task_experts < 0:
            raise MultituneError("cgc_lora: common_experts and task_experts must be >= 0")
        if self.common_experts + self.task_experts < 1:
            raise MultituneError("cgc_lora: common_experts + task_experts must be >= 1 (a gate needs an expert)")
        cluster_of = self.cluster_of()
        clusters = list(dict.fromkeys(cluster_of.values()))  # order of first appearance
        names: list[str] = []
        owner: list[tuple[str, str]] = []  # ("cluster", c) or ("task", t) for each expert
        for c in clusters:
            for i in range(self.common_experts):
                names.append(f"{c}/common{i}")
                owner.append(("cluster", c))
        for t in self.task_names:
            for j in range(self.task_experts):
                names.append(f"{t}/task{j}")
                owner.append(("task", t))
        # the remainder of the rank goes round-robin: common experts over clusters, then task experts over tasks
        order = [clusters.index(c) * self.common_experts + i for i in range(self.common_experts) for c in clusters]
        base = len(clusters) * self.common_experts
        n_tasks = len(self.task_names)
        order += [base + k * self.task_experts + j for j in range(self.task_experts) for k in range(n_tasks)]
        try:
            ranks = split_rank(self.rank, len(names), order)
        except MultituneError as exc:
            raise MultituneError(
                f"cgc_lora: {exc} ({len(clusters)} clusters x {self.common_experts} common + "
                f"{len(self.task_names)} tasks x {self.task_experts} specific); raise rank or use fewer experts"
            ) from None

        rows = [tuple(o == ("cluster", cluster_of[t]) or o == ("task", t) for o in owner) for t in self.task_names]
        gate_names = list(self.task_names)
        if self.common_experts:
            if DEFAULT_CLUSTER in clusters or len(clusters) == 1:
                pick = {DEFAULT_CLUSTER if DEFAULT_CLUSTER in clusters else clusters[0]}
            else:
                pick = set(clusters)
            rows.append(tuple(o[0] == "cluster" and o[1] in pick for o in owner))
            gate_names.append(COMMON)
            for c in clusters:
                rows.append(tuple(o == ("cluster", c) for o in owner))
                gate_names.append(f"{COMMON}:{c}")
        return ExpertLayout(
            method="cgc_lora",
            expert_names=tuple(names),
            expert_ranks=tuple(ranks),
            gate_names=tuple(gate_names),
            allowed=tuple(rows),
            n_learned=len(self.task_names),
            clusters=tuple((c, tuple(t for t in self.task_names if cluster_of[t] == c)) for c in clusters),
        )


def experts_config(model_or_config: Any) -> ExpertsConfig:
    """The (active) moe_lora / cgc_lora config of a PeftModel, a tuner, a tuned model, or the config itself."""
    return active_config(model_or_config, ExpertsConfig, "moe_lora / cgc_lora")


def task_id(model_or_config: Any, name: str, fallback: str | None = None) -> int:
    """The gate row of task `name`.

    A task the model was not trained on raises MultituneError, unless `fallback` says what to use
    instead: "common" (a uniform gate over the common experts, see the module docstring),
    "common:<cluster>" (cgc_lora), or the name of a known task.
    """
    cfg = experts_config(model_or_config)
    layout = cfg.layout()
    if name in layout.gate_names[: layout.n_learned]:
        return layout.row(name)
    if fallback is None:
        raise MultituneError(f"unknown task '{name}'; the model knows: {', '.join(cfg.task_names)}")
    if fallback in layout.gate_names:
        return layout.row(fallback)
    choices = ", ".join(layout.gate_names[layout.n_learned :]) or "none (this model has no common experts)"
    raise MultituneError(
        f"unknown task '{name}' and unknown fallback '{fallback}'; fallbacks: {choices}, or a known task"
    )


def gate_row(model_or_config: Any, name: str) -> int:
    """The gate row of a task or of a reserved fallback name ("common", "common:<cluster>")."""
    layout = experts_config(model_or_config).layout()
    if name in layout.gate_names:
        return layout.row(name)
    return task_id(model_or_config, name)  # raises the one-line error
