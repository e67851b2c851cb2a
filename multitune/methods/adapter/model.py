"""The PEFT tuner of bottleneck adapters, its registration with PEFT, and `apply_adapter`.

Registration makes ``adapter`` an ordinary PEFT method: `get_peft_model(model, AdapterConfig(...))`,
`save_pretrained` and `PeftModel.from_pretrained` work once multitune.methods.adapter is imported
(config.py adds ADAPTER to PEFT's `PeftType` enum the way the experts do, then `register_peft_method`).

The modules to wrap come from the model's structure, not from names in the config: the decoder layers
are the ModuleList as long as the config's ``num_hidden_layers``, and in each layer the attention and
the MLP are the children with the usual names (`ATTENTION_NAMES`, `MLP_NAMES`). That covers Llama,
Qwen2, Mistral, Phi, GPT-2, GPT-NeoX, Falcon... without a per-architecture table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from multitune._compat import register_peft_method
from multitune.errors import MultituneError
from multitune.methods.adapter.config import ADAPTER, MERGE_ERROR, PLACES, AdapterConfig
from multitune.methods.adapter.layer import BottleneckLayer

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise MultituneError(f"adapter: {type(model).__name__} has no Hugging Face config")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def hidden_size(model: nn.Module) -> int:
    d = getattr(_text_config(model), "hidden_size", None)
    if not isinstance(d, int):
        raise MultituneError(f"adapter: the config of {type(model).__name__} names no hidden_size")
    return d


def _child(layer: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(layer, n, None), nn.Module)), None)


def find_places(model: nn.Module, style: str) -> dict[str, str]:
    """{module name: "attn" | "mlp"} of the sub-blocks that get an adapter under `style`, in layer order."""
    n_layers = getattr(_text_config(model), "num_hidden_layers", None)
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != n_layers:
            continue
        found: dict[str, str] = {}
        for i, layer in enumerate(module):
            children = {"attn": _child(layer, ATTENTION_NAMES), "mlp": _child(layer, MLP_NAMES)}
            if None in children.values():
                break
            for role in PLACES[style]:
                found[f"{prefix}.{i}.{children[role]}" if prefix else f"{i}.{children[role]}"] = role
        else:
            return found
    raise MultituneError(
        f"adapter: found no decoder layers in {type(model).__name__}: expected a ModuleList of num_hidden_layers="
        f"{n_layers} layers, each with an attention ({'/'.join(ATTENTION_NAMES)}) and an MLP ({'/'.join(MLP_NAMES)})"
    )


class AdapterModel(BaseTuner):
    """Wraps the attention and/or MLP of every decoder layer in a `BottleneckLayer`."""

    prefix = "adapter_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict[str, list[str]] = {}

    @property
    def places(self) -> dict[str, str]:
        return self.__dict__.setdefault("_places", {})

    def _check_new_adapter_config(self, config: AdapterConfig) -> None:
        if not isinstance(config, AdapterConfig):
            raise MultituneError(f"AdapterModel needs an AdapterConfig, got {type(config).__name__}")

    def _prepare_adapter_config(self, peft_config: AdapterConfig, model_config: dict) -> AdapterConfig:
        return peft_config  # targets come from the model's structure (find_places), not from a name table

    def _prepare_model(self, peft_config: AdapterConfig, model: nn.Module) -> None:
        self.places.clear()
        self.places.update(find_places(model, peft_config.style))
        self.__dict__["_hidden"] = hidden_size(model)

    def _check_target_module_exists(self, peft_config: AdapterConfig, key: str) -> bool:
        return key in self.places

    def _create_and_replace(
        self,
        peft_config: AdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckLayer(
            target, adapter_name, peft_config, self.places[current_key], self.__dict__["_hidden"]
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(new_module, BottleneckLayer):
            super()._replace_module(parent, child_name, new_module, child)
        else:  # unload: put the sub-block back as it was (PEFT's version copies a `.weight` it does not have)
            setattr(parent, child_name, new_module)

    def _check_merge_allowed(self) -> None:
        raise MultituneError(MERGE_ERROR)

    def describe(self, adapter_name: str = "default") -> str:
        """One line: style, sizes, places and the adapters per place (and whose they are)."""
        config: AdapterConfig = self.peft_config[adapter_name]
        layers = [m for m in self.model.modules() if isinstance(m, BottleneckLayer) and adapter_name in m.adapter_down]
        d = self.__dict__.get("_hidden") or hidden_size(self.model)
        m = config.bottleneck_size(d)
        roles = sorted({layer.role for layer in layers}, key=("attn", "mlp").index)
        owners = {"none": "shared by all tasks", "task": "one per task", "cluster": "one per cluster"}[config.per_task]
        slots = config.slot_names()
        line = (
            f"adapter ({config.style}): bottleneck {m} of hidden {d}, {config.activation}; "
            f"{len(layers)} places ({' + '.join(roles)} of each decoder layer); "
            f"{len(slots)} adapter(s) per place, {owners}"
        )
        if config.per_task == "cluster":
            groups = {c: [t for t, tc in config.cluster_of().items() if tc == c] for c in slots}
            line += " (" + ", ".join(f"{c}: {'+'.join(ts)}" for c, ts in groups.items()) + ")"
        return line


def _register() -> None:
    """Make the method known to PEFT (idempotent; a reloaded module replaces its old classes)."""
    register_peft_method("adapter", ADAPTER, AdapterConfig, AdapterModel)


_register()


def apply_adapter(
    model: nn.Module,
    task_names: Sequence[str] = (),
    clusters: dict[str, str] | None = None,
    say: Callable[[str], Any] | None = print,
    **options: Any,
) -> PeftModel:
    """Wrap `model` with bottleneck adapters (frozen base, only the adapters train).

    options: style, reduction_factor, bottleneck, activation, dropout, per_task (None: the default).
    `task_names` (task id i = task_names[i]) and `clusters` (task -> cluster) matter only with
    per_task "task" / "cluster". `say` gets the layout line (None: silent).
    """
    known = {"style", "reduction_factor", "bottleneck", "activation", "dropout", "per_task"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise MultituneError(f"method adapter has no option '{unknown[0]}'; known: {', '.join(sorted(known))}")
    kwargs = {k: v for k, v in options.items() if v is not None}
    config = AdapterConfig(task_names=list(task_names), clusters=dict(clusters) if clusters else None, **kwargs)
    peft_model = get_peft_model(model, config)
    if say is not None:
        say(peft_model.base_model.describe())
    return peft_model
