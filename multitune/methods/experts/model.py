"""The PEFT tuners of moe_lora and cgc_lora, their registration with PEFT, and `apply_experts`.

Registration makes them ordinary PEFT methods: `get_peft_model(model, MoeLoraConfig(...))`,
`save_pretrained` and `PeftModel.from_pretrained` work once multitune.methods.experts is
imported. PEFT has no public way to add a member to its `PeftType` enum, which
`register_peft_method` requires; config.py adds MOE_LORA and CGC_LORA to it (see
`multitune._compat.extend_peft_type`), then `register_peft_method` fills PEFT's mappings as for a built-in method.

The gate (task embedding and, with gate="shared", the projection) is shared state kept on the
tuner, like VeRA's shared matrices: PEFT saves and loads tuner-level parameters with the adapter.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from multitune._compat import register_peft_method
from multitune.errors import MultituneError
from multitune.methods.experts.config import (
    CGC_LORA,
    MOE_LORA,
    CgcLoraConfig,
    ExpertsConfig,
    MoeLoraConfig,
    experts_config,
    task_id,
)
from multitune.methods.experts.layer import CgcLoraLinear, ExpertsLinear, GateRouter, MoeLoraLinear
from multitune.methods.task_context import current_task_context
from multitune.methods.task_lora import config_kwargs

logger = logging.getLogger(__name__)


class _StoreScales:
    """Forward pre-hook on the wrapped transformers model: computes the per-row gate scales once per
    forward, before any (checkpointed) layer runs. Holds the tuner weakly so copies of the model
    (see export.merge_task) never keep it alive."""

    def __init__(self, tuner: ExpertsModel) -> None:
        self.tuner = weakref.ref(tuner)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        tuner = self.tuner()
        ctx = current_task_context()
        if tuner is None or ctx is None:
            return None  # without a context the layers raise the explanatory error themselves
        for name in tuner.active_adapters:
            router = tuner.routers.get(name)
            if router is not None:
                router.store_scales(ctx)
        return None


class ExpertsModel(BaseTuner):
    """Shared tuner of moe_lora and cgc_lora; the subclasses only name the prefix and layer class."""

    uses_shared_state = True
    tuner_layer_cls: type[ExpertsLinear] = ExpertsLinear
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    @property
    def routers(self) -> dict[str, GateRouter]:
        return self.__dict__.setdefault("_routers", {})

    def _container(self, suffix: str) -> nn.ModuleDict:
        name = self.prefix + suffix
        if name not in self._modules:
            self.add_module(name, nn.ModuleDict())
        return self._modules[name]

    def _check_new_adapter_config(self, config: ExpertsConfig) -> None:
        if not isinstance(config, ExpertsConfig):
            raise MultituneError(f"{type(self).__name__} needs an experts config, got {type(config).__name__}")

    def _pre_injection_hook(self, model: nn.Module, config: ExpertsConfig, adapter_name: str) -> None:
        layout = config.layout()
        device = next(model.parameters()).device
        embedding = nn.Embedding(layout.n_learned, config.task_embedding_dim, device=device)  # N(0, 1)
        self._container("task_embedding")[adapter_name] = embedding
        proj = None
        if config.gate == "shared":
            proj = nn.Linear(config.task_embedding_dim, layout.n_experts, bias=False, device=device)
            nn.init.zeros_(proj.weight)  # uniform gates at the start: no expert is favoured before training
            self._container("gate")[adapter_name] = proj
        self.routers[adapter_name] = GateRouter(config, layout, embedding, proj)

    def _create_and_replace(
        self,
        peft_config: ExpertsConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        router = self.routers[adapter_name]
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, router)
            return
        new_module = self.tuner_layer_cls(target, adapter_name, peft_config, router)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: ExpertsConfig, adapter_name: str) -> None:
        if "_scales_hook" not in self.__dict__:
            self.__dict__["_scales_hook"] = model.register_forward_pre_hook(_StoreScales(self))
        if config.inference_mode:
            for suffix in ("task_embedding", "gate"):
                if adapter_name in self._container(suffix):
                    self._container(suffix)[adapter_name].requires_grad_(False)
        logger.info(config.layout().describe())

    def _check_merge_allowed(self) -> None:
        raise MultituneError(
            f"{self.prefix.rstrip('_')} cannot be merged as a whole: its update depends on the task; "
            "use multitune.methods.experts.export.merge_task(model, task) for one task's merged model"
        )


class MoeLoraModel(ExpertsModel):
    prefix = "moe_lora_"
    tuner_layer_cls = MoeLoraLinear


class CgcLoraModel(ExpertsModel):
    prefix = "cgc_lora_"
    tuner_layer_cls = CgcLoraLinear


def _register() -> None:
    """Make both methods known to PEFT (idempotent; a reloaded module replaces its old classes)."""
    for name, peft_type, config_cls, model_cls in (
        ("moe_lora", MOE_LORA, MoeLoraConfig, MoeLoraModel),
        ("cgc_lora", CGC_LORA, CgcLoraConfig, CgcLoraModel),
    ):
        register_peft_method(name, peft_type, config_cls, model_cls)


_register()

METHODS: dict[str, type[ExpertsConfig]] = {"moe_lora": MoeLoraConfig, "cgc_lora": CgcLoraConfig}
_ONLY = {"moe_lora": {"experts"}, "cgc_lora": {"common_experts", "task_experts"}}
_KWARGS = {"rank", "alpha", "dropout", "targets", "gate", "gate_norm", "task_embedding_dim"}


def apply_experts(
    model: nn.Module,
    method_name: str,
    task_names: list[str],
    clusters: dict[str, str] | None = None,
    say: Callable[[str], Any] | None = print,
    **method_kwargs: Any,
) -> PeftModel:
    """Wrap `model` with task-gated LoRA experts (frozen base, only experts and gate train).

    method_kwargs: rank, alpha, dropout, targets ("all-linear" or module names), gate
    ("shared" | "per_layer"), task_embedding_dim, and experts (moe_lora) or common_experts /
    task_experts (cgc_lora); None means the default. `clusters` (task -> cluster) is used by
    cgc_lora only: MOELoRA's experts are all shared. `say` gets the rank split (None: silent).
    """
    if method_name not in METHODS:
        raise MultituneError(f"unknown task-gated method '{method_name}'; choose one of: {', '.join(METHODS)}")
    kwargs = config_kwargs(method_name, method_kwargs, _KWARGS, _ONLY)
    if method_name == "cgc_lora":
        kwargs["clusters"] = dict(clusters) if clusters else None
    config = METHODS[method_name](task_names=list(task_names), **kwargs)
    peft_model = get_peft_model(model, config)
    if say is not None:
        say(config.layout().describe())
    return peft_model


def task_ids(model_or_config: Any, names: Sequence[str], fallback: str | None = None) -> torch.Tensor:
    """The LongTensor of gate rows of a batch of task names (see `task_id` for `fallback`)."""
    cfg = experts_config(model_or_config)
    return torch.tensor([task_id(cfg, n, fallback) for n in names], dtype=torch.long)
