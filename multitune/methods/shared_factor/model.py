"""The PEFT tuners of lora_experts and mtl_lora, their registration with PEFT, and `apply_shared_factor`.

Registered like moe_lora / cgc_lora (see methods/experts/model.py): once this package is
imported, `get_peft_model`, `save_pretrained` and `PeftModel.from_pretrained` work as for a
built-in method. Every parameter lives on its layer (the task weights are per layer, as in both
papers' code), so unlike the gated experts there is no shared state on the tuner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from multitune._compat import register_peft_method
from multitune.errors import MultituneError
from multitune.methods.shared_factor.config import (
    LORA_EXPERTS,
    MTL_LORA,
    LoraExpertsConfig,
    MtlLoraConfig,
    SharedFactorConfig,
    shared_factor_config,
    task_id,
)
from multitune.methods.shared_factor.layer import LoraExpertsLinear, MtlLoraLinear, SharedFactorLinear
from multitune.methods.task_lora import config_kwargs

logger = logging.getLogger(__name__)


class SharedFactorModel(BaseTuner):
    """Shared tuner of lora_experts and mtl_lora; the subclasses name the prefix and layer class."""

    tuner_layer_cls: type[SharedFactorLinear] = SharedFactorLinear
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _check_new_adapter_config(self, config: SharedFactorConfig) -> None:
        if not isinstance(config, SharedFactorConfig):
            raise MultituneError(f"{type(self).__name__} needs a shared-factor config, got {type(config).__name__}")

    def _create_and_replace(
        self,
        peft_config: SharedFactorConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = self.tuner_layer_cls(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: SharedFactorConfig, adapter_name: str) -> None:
        logger.info(config.describe())

    def _check_merge_allowed(self) -> None:
        raise MultituneError(
            f"{self.prefix.rstrip('_')} cannot be merged as a whole: its update depends on the task; "
            "use multitune.methods.shared_factor.merge_task(model, task) for one task's merged model"
        )


class LoraExpertsModel(SharedFactorModel):
    prefix = "lora_experts_"
    tuner_layer_cls = LoraExpertsLinear


class MtlLoraModel(SharedFactorModel):
    prefix = "mtl_lora_"
    tuner_layer_cls = MtlLoraLinear


def _register() -> None:
    """Make both methods known to PEFT (idempotent; a reloaded module replaces its old classes)."""
    for name, peft_type, config_cls, model_cls in (
        ("lora_experts", LORA_EXPERTS, LoraExpertsConfig, LoraExpertsModel),
        ("mtl_lora", MTL_LORA, MtlLoraConfig, MtlLoraModel),
    ):
        register_peft_method(name, peft_type, config_cls, model_cls)


_register()

METHODS: dict[str, type[SharedFactorConfig]] = {"lora_experts": LoraExpertsConfig, "mtl_lora": MtlLoraConfig}
_ONLY = {"lora_experts": {"share", "experts"}, "mtl_lora": {"up_projections"}}
_KWARGS = {"rank", "alpha", "dropout", "targets", "temperature"}


def apply_shared_factor(
    model: nn.Module,
    method_name: str,
    task_names: list[str],
    say: Callable[[str], Any] | None = print,
    **method_kwargs: Any,
) -> PeftModel:
    """Wrap `model` with lora_experts or mtl_lora (frozen base; only A, B, the task weights and
    Lambda train). method_kwargs: rank, alpha, dropout, targets ("all-linear" or module names),
    temperature, and share / experts (lora_experts) or up_projections (mtl_lora); None means the
    default. `say` gets a line on the rank split (None: silent)."""
    if method_name not in METHODS:
        raise MultituneError(f"unknown shared-factor method '{method_name}'; choose one of: {', '.join(METHODS)}")
    config = METHODS[method_name](
        task_names=list(task_names), **config_kwargs(method_name, method_kwargs, _KWARGS, _ONLY)
    )
    peft_model = get_peft_model(model, config)
    if say is not None:
        say(config.describe())
    return peft_model


def task_ids(model_or_config: Any, names: Sequence[str], fallback: str | None = None) -> torch.Tensor:
    """The LongTensor of gate rows of a batch of task names (see `task_id` for `fallback`)."""
    cfg = shared_factor_config(model_or_config)
    return torch.tensor([task_id(cfg, n, fallback) for n in names], dtype=torch.long)
