"""The schema of a run: every key of the YAML, its type, default and bounds (pydantic), and the
checks across keys. Loading, overrides and error messages are in config/load.py."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from multitune.errors import MultituneError

TASK_KINDS = ("classification", "generation", "extractive_qa", "text")
BIG = 1 << 16  # upper bound of sizes and counts: past it a value is a typo that would hang or exhaust memory


class Strict(BaseModel):
    # inf and nan are typos or overflows in a config, never settings (train.lr=inf trains NaN weights)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataConfig(Strict):
    """Where a task's rows come from: one file per split, or a Hugging Face dataset by name."""

    train: str | None = None
    dev: str | None = None
    test: str | None = None
    hf_dataset: str | None = Field(None, description="datasets.load_dataset name; splits are then split names")
    hf_subset: str | None = None


class TaskConfig(Strict):
    name: str
    kind: Literal["classification", "generation", "extractive_qa", "text"]
    data: DataConfig
    prompt: str | None = None
    target: str | None = None
    labels: list[str] | None = None
    metric: Literal["rouge_l", "bleu", "chrf"] | None = None
    references: str | None = None
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    cluster: str | None = None
    domain: str | None = Field(None, description="domain label for train.domain (DANN / CORAL / MMD)")

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, v: str) -> str:
        # a task name becomes a folder name (compare's single-task runs, exports): nothing that
        # could lead elsewhere ('..', '/', a leading '.')
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError(
                f"{v!r} is not a task name: use letters, digits, '_', '-' and '.' (not first), at most 100"
            )
        return v

    @model_validator(mode="after")
    def _kind_needs(self) -> TaskConfig:
        if self.kind == "text":
            self.prompt = self.prompt or "{{ text }}"
            if self.target is not None:
                raise ValueError("a text task has no target: its prompt template is the text")
        else:
            if not self.prompt or not self.target:
                raise ValueError(f"a {self.kind} task needs both 'prompt' and 'target'")
        if self.kind == "classification":
            if not self.labels or len(set(self.labels)) != len(self.labels):
                raise ValueError("a classification task needs 'labels': a list of distinct labels")
        elif self.labels is not None:
            raise ValueError(f"'labels' is only for classification tasks, not {self.kind}")
        if self.metric is not None and self.kind != "generation":
            raise ValueError("'metric' is only for generation tasks")
        if self.kind == "generation":
            self.metric = self.metric or "rouge_l"
        if self.kind == "extractive_qa":
            self.references = self.references or "answers"
        if self.data.train is None and self.data.dev is None and self.data.test is None:
            raise ValueError("'data' names no split: give train, dev and/or test")
        return self


class LowRankBudget(Strict):
    """What LoRA and the task-gated experts share: the rank budget and where it goes."""

    rank: int = Field(16, ge=1, le=BIG, description="total rank, as a plain LoRA of this rank")
    alpha: float = 32.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: str | list[str] = Field("all-linear", description="all-linear | attention | mlp | module names")


class LoraMethod(LowRankBudget):
    name: Literal["lora"]
    rslora: bool = False
    dora: bool = False
    lora_plus_ratio: float | None = Field(None, gt=0, description="LoRA+: B learns at lr x ratio (paper: 16)")


class FullMethod(Strict):
    name: Literal["full"]


class FreezeMethod(Strict):
    """Partial fine-tuning: everything frozen except the last layers and/or named modules."""

    name: Literal["freeze"]
    last_layers: int = Field(0, ge=0)
    modules: list[str] = Field(default_factory=list, description="regexes matched against parameter names")

    @model_validator(mode="after")
    def _something_trains(self) -> FreezeMethod:
        if self.last_layers == 0 and not self.modules:
            raise ValueError("freeze trains nothing: set 'last_layers' and/or 'modules'")
        return self


# count is the default: at the quality study's budget it beat the published softmax gate (docs/results.md);
# PEFT's ExpertsConfig keeps softmax as its default, so adapters saved without the field load as they were
GATE_NORM = (
    "count (default): a task's gate weights sum to the number of experts it sees (each expert then moves "
    "the output as much as the same rank slots of a plain LoRA at uniform gates); softmax: they sum to 1, "
    "as MOELoRA and CGC-LoRA are published"
)
GATE_LR = (
    "the gate's parameters learn at lr x ratio; AdamW moves a parameter by about lr per step whatever "
    "its gradient, so at lr 5e-4 a gate logit moves by at most ~0.25 in 500 steps"
)


class MoeLoraMethod(LowRankBudget):
    """MOELoRA: `experts` LoRA experts share the rank budget; a task-motivated gate mixes them."""

    name: Literal["moe_lora"]
    experts: int = Field(4, ge=1, le=1024)
    gate: Literal["shared", "per_layer"] = "shared"
    gate_norm: Literal["softmax", "count"] = Field("count", description=GATE_NORM)
    gate_lr_ratio: float | None = Field(None, gt=0, description=GATE_LR)


class CgcLoraMethod(LowRankBudget):
    """CGC-LoRA: per cluster of tasks, common experts; per task, its own experts; the gate of a
    task mixes its cluster's common experts and its own experts only."""

    name: Literal["cgc_lora"]
    common_experts: int = Field(2, ge=1, le=1024)
    task_experts: int = Field(1, ge=0, le=1024)
    gate: Literal["shared", "per_layer"] = "shared"
    gate_norm: Literal["softmax", "count"] = Field("count", description=GATE_NORM)
    gate_lr_ratio: float | None = Field(None, gt=0, description=GATE_LR)


class LoraExpertsMethod(LowRankBudget):
    """Shared-factor experts (HydraLoRA with a task-id gate, share: A; its mirror, share: B): one
    factor shared by all tasks, the other split into `experts` that each task mixes with its own
    softmax weights; the experts split the rank budget."""

    name: Literal["lora_experts"]
    share: Literal["A", "B"] = "A"
    experts: int = Field(4, ge=1, le=1024)
    temperature: float = Field(1.0, gt=0, description="a task's weights are softmax(z_t / temperature)")
    gate_lr_ratio: float | None = Field(None, gt=0, description=GATE_LR)

    @model_validator(mode="after")
    def _rank_splits(self) -> LoraExpertsMethod:
        if self.rank % self.experts:  # every expert multiplies the same shared factor: one rank for all
            low = self.rank - self.rank % self.experts
            ranks = f"{low} or {low + self.experts}" if low else f"{self.experts}"
            raise ValueError(
                f"rank {self.rank} does not split evenly over {self.experts} experts (each multiplies the same "
                f"shared factor, so all need one rank); use rank {ranks}"
            )
        return self


class MtlLoraMethod(LowRankBudget):
    """MTL-LoRA: a shared A of rank `rank`, a task transform Lambda_t (rank x rank), and
    `up_projections` shared B_i mixed by each task's softmax weights."""

    name: Literal["mtl_lora"]
    rank: int = Field(8, ge=1, le=BIG, description="r: the rank of A and of every B_i (not split)")
    alpha: float = 16.0  # alpha / r = 2, as the default LoRA's 32 / 16
    up_projections: int = Field(3, ge=1, le=1024)
    temperature: float = Field(0.1, gt=0, description="a task's weights are softmax(z_t / temperature) (paper: 0.1)")
    gate_lr_ratio: float | None = Field(None, gt=0, description=GATE_LR)


class AdapterMethod(Strict):
    """Bottleneck adapters: h <- h + up(act(down(h))) after the MLP (pfeiffer), after attention and MLP
    (houlsby), or beside the MLP (parallel); optionally one adapter per task or per cluster."""

    name: Literal["adapter"]
    style: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    reduction_factor: int = Field(16, ge=1, description="bottleneck width = hidden size // reduction_factor")
    bottleneck: int | None = Field(None, ge=1, description="bottleneck width; overrides reduction_factor")
    activation: Literal["relu", "gelu", "silu"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    per_task: Literal["none", "task", "cluster"] = "none"


MethodConfig = Annotated[
    LoraMethod
    | FullMethod
    | FreezeMethod
    | MoeLoraMethod
    | CgcLoraMethod
    | LoraExpertsMethod
    | MtlLoraMethod
    | AdapterMethod,
    Field(discriminator="name"),
]
EXPERT_METHODS = ("moe_lora", "cgc_lora", "lora_experts", "mtl_lora")


class MixingConfig(Strict):
    strategy: Literal["proportional", "temperature", "uniform", "weights"] = "temperature"
    temperature: float = Field(2.0, gt=0)
    weights: dict[str, float] | None = None


class EarlyStoppingConfig(Strict):
    metric: str = Field("mean", description="'mean' or '<task>/<metric>', e.g. 'sst2/accuracy'")
    patience: int = Field(3, ge=1)
    restore_best: bool = True


# The balancing methods, the one list the config's choices come from: loss weightings are the
# balancers of training/loss_weighting.py, surgery the direction functions of training/surgery.py
# (tests/test_registry.py checks both tables name exactly these).
BALANCE_WEIGHTINGS = ("equal", "static", "uncertainty", "dwa", "famo")
BALANCE_SURGERY = ("pcgrad", "cagrad", "aligned_mtl", "mgda", "imtl_g")
BalanceMethod = Literal[("rows", *BALANCE_WEIGHTINGS, *BALANCE_SURGERY)]


class BalanceConfig(Strict):
    """How per-task losses become one update. `rows` (default): the mean over the batch's rows, so
    the mixture alone sets each task's share; a loss weighting; or gradient surgery on the per-task
    gradients (coordinates that only one task reaches, such as task-specific experts, are left as is)."""

    method: BalanceMethod = "rows"
    weights: dict[str, float] | None = Field(None, description="static: weight per task")
    temperature: float = Field(2.0, gt=0, description="dwa: softmax temperature")
    beta: float = Field(0.9, ge=0, lt=1, description="dwa: smoothing of the step losses")
    famo_lr: float = Field(0.025, gt=0, description="famo: learning rate of the task logits")
    famo_decay: float = Field(0.001, ge=0, description="famo: weight decay of the task logits")
    cagrad_c: float = Field(0.4, ge=0, description="cagrad: radius of the conflict-averse ball")

    @model_validator(mode="before")
    @classmethod
    def _name_only(cls, data: Any) -> Any:
        return {"method": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _weights_for_static(self) -> BalanceConfig:
        if (self.method == "static") != (self.weights is not None):
            raise ValueError("'weights' goes with method 'static' (and static needs them)")
        return self


class DomainConfig(Strict):
    """Domain-invariant representations across the tasks' `domain:` labels: DANN (a domain
    classifier behind a gradient-reversal layer) or an alignment loss (CORAL, MMD) between the
    `target` domain's rows and the others', on the mean-pooled hidden states of `layer`."""

    method: Literal["dann", "coral", "mmd"]
    weight: float = Field(0.1, ge=0, description="weight of the domain loss next to the task loss")
    layer: int = Field(-1, description="hidden-state layer to pool (-1: the last)")
    max_lambda: float = Field(1.0, gt=0, description="dann: final gradient-reversal strength")
    gamma: float = Field(10.0, gt=0, description="dann: speed of the lambda warm-up")
    width: int = Field(256, ge=1, le=BIG, description="dann: hidden width of the domain classifier")
    lr_ratio: float = Field(10.0, gt=0, description="dann: the classifier learns at lr x ratio, to keep up")
    target: str | None = Field(None, description="coral/mmd: the domain aligned to the others (default: the last)")


class RetentionConfig(Strict):
    """A general-text reference set whose perplexity is measured before training and at every
    eval: how much general ability the fine-tune costs."""

    data: str | None = Field(None, description="JSONL file of general text")
    field: str = "text"
    task: str | None = Field(None, description="or: the dev prompts of this task (e.g. a non-domain task)")
    max_examples: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> RetentionConfig:
        if (self.data is None) == (self.task is None):
            raise ValueError("give exactly one of 'data' (a JSONL file) or 'task' (a task whose dev prompts to use)")
        return self


Tracker = Literal["tensorboard", "mlflow", "wandb", "comet_ml", "aim", "clearml", "dvclive", "trackio", "swanlab"]


class TrainConfig(Strict):
    epochs: float = Field(1.0, gt=0, le=10_000)
    max_steps: int | None = Field(None, ge=1, le=10**9)
    batch_size: int = Field(8, ge=1, le=BIG)
    grad_accum: int = Field(1, ge=1, le=BIG)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_length: int = Field(512, ge=8, le=1 << 20)
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    early_stopping: EarlyStoppingConfig | None = None
    seed: int = Field(0, ge=0, lt=2**32, description="numpy and torch take seeds below 2**32")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward: less memory")
    compile: bool = Field(False, description="torch.compile each decoder layer (dynamic shapes)")
    threads: int | None = Field(None, ge=1, le=4096)
    report_to: list[Tracker] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers (Accelerate's): tensorboard, mlflow, wandb, comet_ml, aim, ...; [] for none",
    )
    row_loss: Literal["mean", "sum"] = Field(
        "mean",
        description="a row's loss: the mean NLL of its target tokens, or their sum (-log p(target | prompt), "
        "what classification scores compare; a label's deciding token then weighs the same whatever its length)",
    )
    packing: bool = Field(True, description="rows end to end in sequences of <= pack_length: little padding compute")
    pack_length: int | None = Field(
        None, ge=8, le=1 << 20, description="tokens per packed sequence (default: 2048 on a CPU, max_length elsewhere)"
    )
    balance: BalanceConfig = Field(default_factory=BalanceConfig)
    interference_every: int | None = Field(None, ge=1, description="per-task gradient cosines every N steps")
    affinity_every: int | None = Field(None, ge=1, description="lookahead task affinity (TAG) every N steps")
    affinity_lr: float | None = Field(None, gt=0, description="lookahead SGD step for affinity (default: train.lr)")
    domain: DomainConfig | None = None
    l2sp: float | None = Field(None, gt=0, description="L2-SP: penalty alpha/2 |w - w_pretrained|^2 (full / freeze)")


class EvalConfig(Strict):
    split: Literal["dev", "test"] = "dev"
    max_examples: int | None = Field(None, ge=1, description="per task; None = the whole split")
    batch_size: int = Field(
        32, ge=1, le=BIG, description="prompts per forward (grouped by length) and rows decoded together"
    )
    max_new_tokens: int = Field(48, ge=1, le=BIG)
    zero_shot: bool = Field(True, description="evaluate the base model before training")


class RunConfig(Strict):
    model: str = "smollm2-135m-instruct"
    cache_dir: str | None = None
    chat_template: Literal["auto", "on", "off"] = "auto"
    load_in: Literal["4bit", "8bit"] | None = Field(
        None, description="load the frozen base quantized with bitsandbytes (QLoRA; CUDA only)"
    )
    method: MethodConfig = Field(default_factory=lambda: LoraMethod(name="lora"))
    tasks: list[TaskConfig] = Field(min_length=1)
    mixing: MixingConfig = Field(default_factory=MixingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    retention: RetentionConfig | None = None
    output: str = "runs/run"

    @model_validator(mode="before")
    @classmethod
    def _method_defaults_to_lora(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), dict):
            data["method"].setdefault("name", "lora")
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dupes)}")
        if self.mixing.weights is not None:
            unknown = sorted(set(self.mixing.weights) - set(names))
            if unknown:
                raise ValueError(f"mixing.weights names unknown task(s): {', '.join(unknown)}")
        if self.mixing.strategy == "weights" and self.mixing.weights is None:
            raise ValueError("mixing strategy 'weights' needs 'mixing.weights'")
        if self.load_in is not None and self.method.name in ("full", "freeze"):
            raise ValueError(
                f"load_in: {self.load_in} freezes the base in quantized form: train adapters on it "
                f"(lora, adapter, experts), not {self.method.name}"
            )
        es = self.train.early_stopping
        if es is not None:
            if es.metric != "mean" and es.metric.split("/")[0] not in names:
                raise ValueError(
                    f"train.early_stopping.metric '{es.metric}': use 'mean' or '<task>/<metric>' "
                    f"with a task of this run ({', '.join(names)})"
                )
            if self.train.eval_every is None:
                raise ValueError("train.early_stopping needs train.eval_every")
        if self.train.pack_length is not None and self.train.pack_length < self.train.max_length:
            raise ValueError(
                f"train.pack_length {self.train.pack_length} is shorter than train.max_length "
                f"{self.train.max_length}: a row must fit in a sequence"
            )
        domain = self.train.domain
        if domain is not None:
            domains = list(dict.fromkeys(t.domain for t in self.tasks if t.domain is not None))
            if len(domains) < 2:
                raise ValueError("train.domain needs tasks of at least two domains (set 'domain:' on the tasks)")
            if domain.target is not None and domain.target not in domains:
                raise ValueError(
                    f"train.domain.target '{domain.target}' is not a domain of the tasks ({', '.join(domains)})"
                )
            if self.train.balance.method in BALANCE_SURGERY:
                raise ValueError("train.domain does not combine with gradient surgery (train.balance)")
        if self.train.l2sp is not None and self.method.name not in ("full", "freeze"):
            raise ValueError(
                f"train.l2sp pulls pre-trained weights back; with {self.method.name} they are frozen: "
                "use full or freeze"
            )
        if self.retention is not None and self.retention.task is not None and self.retention.task not in names:
            raise ValueError(f"retention.task '{self.retention.task}' is not a task of this run ({', '.join(names)})")
        weights = self.train.balance.weights
        if weights is not None and set(weights) != set(names):
            raise ValueError(
                f"train.balance.weights must name every task exactly ({', '.join(names)}); got {', '.join(weights)}"
            )
        return self

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise MultituneError(f"unknown task '{name}'; this run has: {', '.join(self.task_names)}")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


# ----------------------------------------------------------------------------- loading
