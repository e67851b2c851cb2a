"""Config of bottleneck adapters (``adapter``) and the choices it implies: where adapters sit, how
big they are, and which adapter each task uses.

A bottleneck adapter maps a hidden state h (width d) to ``h + up(act(down(h)))`` with ``down``: d -> m
and ``up``: m -> d, both with a bias. ``up`` starts at zero, so a new adapter leaves the model exactly as
it was. m is ``bottleneck`` if given, else ``max(1, d // reduction_factor)``.

**Placement** (``style``), in every decoder layer:

- ``houlsby`` (Houlsby et al. 2019): after the attention block's output and after the MLP's output,
  sequentially (the adapter reads the sub-block's output and adds to it), before the residual add.
- ``pfeiffer`` (Pfeiffer et al. 2021): after the MLP's output only, sequentially.
- ``parallel`` (He et al. 2022, "Towards a Unified View of PEFT"): beside the MLP: the adapter reads
  the MLP's input (the hidden state the MLP block sees) and its output is added to the MLP's output.

**Per task** (``per_task``): ``none``: one adapter per place, shared by all tasks; ``task``: one per
task; ``cluster``: one per cluster of tasks (tasks missing from ``clusters`` form the cluster
"default"). Adapter slot i of a place belongs to ``slot_names()[i]``; a row of task id t (its index in
``task_names``) uses slot ``slot_table()[t]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType, TaskType

from multitune._compat import extend_peft_type
from multitune.errors import MultituneError

ADAPTER: PeftType = extend_peft_type("ADAPTER")

STYLES = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = ("relu", "gelu", "silu")
PER_TASK = ("none", "task", "cluster")
DEFAULT_CLUSTER = "default"

# which sub-blocks of a decoder layer get an adapter, per style
PLACES: dict[str, tuple[str, ...]] = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",), "parallel": ("mlp",)}

MERGE_ERROR = (
    "a bottleneck adapter cannot be merged into the base weights: it is non-linear "
    "(down-projection, activation, up-projection); serve the run's PEFT adapter with multitune imported instead"
)


@dataclass
class AdapterConfig(PeftConfig):
    """Bottleneck adapters (Houlsby / Pfeiffer / parallel); see the module docstring."""

    style: Literal["houlsby", "pfeiffer", "parallel"] = field(
        default="pfeiffer", metadata={"help": "houlsby: after attention and MLP; pfeiffer: after MLP; parallel"}
    )
    reduction_factor: int = field(default=16, metadata={"help": "bottleneck width = hidden size // reduction_factor"})
    bottleneck: int | None = field(default=None, metadata={"help": "bottleneck width; overrides reduction_factor"})
    activation: Literal["relu", "gelu", "silu"] = field(default="relu")
    dropout: float = field(default=0.0, metadata={"help": "dropout on the bottleneck activations"})
    per_task: Literal["none", "task", "cluster"] = field(
        default="none", metadata={"help": "one adapter per place shared by all tasks, or one per task / per cluster"}
    )
    task_names: list[str] = field(default_factory=list, metadata={"help": "task id i is task_names[i]"})
    clusters: dict[str, str | None] | None = field(default=None, metadata={"help": "task -> cluster name"})
    # PEFT reads these two on every config; the adapted modules follow from `style`, not from names
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "unused: set by style"})
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        self.peft_type = ADAPTER
        if self.task_type is None:
            self.task_type = TaskType.CAUSAL_LM
        super().__post_init__()
        if self.style not in STYLES:
            raise MultituneError(f"adapter: style must be one of {', '.join(STYLES)}, got '{self.style}'")
        if self.activation not in ACTIVATIONS:
            raise MultituneError(
                f"adapter: activation must be one of {', '.join(ACTIVATIONS)}, got '{self.activation}'"
            )
        if self.per_task not in PER_TASK:
            raise MultituneError(f"adapter: per_task must be one of {', '.join(PER_TASK)}, got '{self.per_task}'")
        if self.reduction_factor < 1:
            raise MultituneError(f"adapter: reduction_factor must be >= 1, got {self.reduction_factor}")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise MultituneError(f"adapter: bottleneck must be >= 1, got {self.bottleneck}")
        if not 0.0 <= self.dropout < 1.0:
            raise MultituneError(f"adapter: dropout must be in [0, 1), got {self.dropout}")
        self.task_names = list(self.task_names)
        dupes = sorted({t for t in self.task_names if self.task_names.count(t) > 1})
        if dupes:
            raise MultituneError(f"adapter: task names repeat: {', '.join(dupes)}")
        if self.per_task != "none" and not self.task_names:
            raise MultituneError(f"adapter: per_task='{self.per_task}' needs task_names (task id i = task_names[i])")
        unknown = sorted(set(self.clusters or {}) - set(self.task_names))
        if unknown:
            raise MultituneError(f"adapter: clusters name unknown tasks: {', '.join(unknown)}")

    def bottleneck_size(self, hidden_size: int) -> int:
        """m, the width of the bottleneck, for a model of hidden size d."""
        return self.bottleneck if self.bottleneck is not None else max(1, hidden_size // self.reduction_factor)

    def cluster_of(self) -> dict[str, str]:
        clusters = self.clusters or {}
        return {t: clusters.get(t) or DEFAULT_CLUSTER for t in self.task_names}

    def slot_names(self) -> list[str]:
        """The owner of each adapter slot of a place: 'all', each task, or each cluster (first-seen order)."""
        if self.per_task == "task":
            return list(self.task_names)
        if self.per_task == "cluster":
            return list(dict.fromkeys(self.cluster_of().values()))
        return ["all"]

    def slot_table(self) -> list[int]:
        """Task id -> adapter slot."""
        if self.per_task == "task":
            return list(range(len(self.task_names)))
        if self.per_task == "cluster":
            names = self.slot_names()
            return [names.index(c) for c in self.cluster_of().values()]
        return [0] * len(self.task_names)

    @property
    def n_slots(self) -> int:
        return len(self.slot_names())
