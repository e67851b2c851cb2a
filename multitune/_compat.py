"""Every reach into another library's private internals, in one place.

multitune uses public APIs wherever one exists. Where none does (out-of-tree PEFT methods, the CPU
flash-attention kernel with its log-sum-exp, the autograd engine's "inside a backward" flag), the
reach is here, behind a small function that checks what it needs is there and otherwise stops
with one line naming the library, the missing piece and the versions multitune supports, instead
of an AttributeError deep in a training step. pyproject.toml states the same ranges; CI runs at
their lower ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

from multitune.errors import MultituneError

SUPPORTED = {
    "torch": ">=2.4",
    "transformers": ">=5.24,<6",
    "peft": ">=0.21.2,<0.22",
    "accelerate": ">=1.15,<2",
}


def _missing(library: str, what: str) -> MultituneError:
    try:
        installed = version(library)
    except PackageNotFoundError:
        installed = "not installed"
    return MultituneError(
        f"{library} {installed} has no {what}, which multitune needs; supported: {library}{SUPPORTED[library]}"
    )


# --- PEFT: methods that live outside PEFT's tree (moe_lora, cgc_lora, lora_experts, mtl_lora, adapter)


def extend_peft_type(name: str):
    """Add `name` to PEFT's `PeftType` enum (PEFT has no public hook for out-of-tree methods, and
    `register_peft_method` insists on a member). Idempotent."""
    from peft.utils.peft_types import PeftType

    if name in PeftType.__members__:
        return PeftType[name]
    if not all(hasattr(PeftType, a) for a in ("_member_map_", "_value2member_map_", "_member_names_")):
        raise _missing("peft", "PeftType enum of the usual layout")
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register_peft_method(name: str, peft_type, config_cls: type, model_cls: type) -> None:
    """Make a method known to PEFT; registering again (a reloaded module) replaces the classes,
    which `peft.utils.register_peft_method` refuses, so the mappings are written directly then."""
    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        from peft.utils import register_peft_method as register
    except ImportError as e:
        raise _missing("peft", f"method registry ({e})") from None
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
    else:
        register(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """A base layer's (in, out) features as PEFT reads them (nn.Linear, GPT-2's Conv1D, ...)."""
    try:
        from peft.tuners.tuners_utils import _get_in_out_features
    except ImportError:
        raise _missing("peft", "tuners_utils._get_in_out_features") from None
    return _get_in_out_features(layer)


def become(module: nn.Module, cls: type) -> None:
    """Give a PEFT layer a subclass's forward in place (its weights and adapters stay as they are);
    the subclass adds no state, so only PEFT's own attributes are read."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = cls


# --- torch ------------------------------------------------------------------------------------


def in_backward() -> bool:
    """Whether this thread runs inside an autograd backward (autograd's worker threads do)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    if current is None:
        raise _missing("torch", "torch._C._current_graph_task_id")
    return current() != -1


def tensor_version(t: torch.Tensor) -> int:
    """The in-place modification counter of a tensor: a cache keyed by it is never stale."""
    return t._version


@contextlib.contextmanager
def without_compiled_calls(model: nn.Module) -> Iterator[None]:
    """Run the modules `nn.Module.compile()` compiled eagerly inside this block."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    for module, _ in compiled:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, impl in compiled:
            module._compiled_call_impl = impl


def cpu_flash_attention():
    """aten's CPU flash-attention forward and backward: the only kernels that return the
    log-sum-exp, which combining attention over query blocks needs."""
    aten = torch.ops.aten
    try:
        return (
            aten._scaled_dot_product_flash_attention_for_cpu,
            aten._scaled_dot_product_flash_attention_for_cpu_backward,
        )
    except (AttributeError, RuntimeError):
        raise _missing("torch", "aten._scaled_dot_product_flash_attention_for_cpu(_backward)") from None


# --- transformers -----------------------------------------------------------------------------


def drop_quantizer(model: nn.Module) -> None:
    """A GGUF model is dequantized on load; without its quantizer `save_pretrained` writes it as the
    plain float model it now is."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextlib.contextmanager
def no_gguf_tensor_bar() -> Iterator[None]:
    """transformers dequantizes a GGUF file's tensors under a bare tqdm bar that no logging switch
    turns off, which a log file receives as one line of carriage returns; the caller reports the
    conversion's progress itself (models/base.py), so the bar is replaced by the plain iterable."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - the conversion itself reports a missing piece
        yield
        return
    if not hasattr(gguf_utils, "tqdm"):
        yield  # a transformers without the bar: nothing to replace
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def sdpa_pieces():
    """transformers' SDPA attention forward and mask builder, which the query-block attention
    falls back to and registers beside."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise _missing("transformers", f"SDPA attention interface ({e})") from None
    return sdpa_attention_forward, AttentionMaskInterface, sdpa_mask


def dynamic_layer_cls() -> type:
    """The per-layer KV cache class that the batched evaluator fills and trims."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        raise _missing("transformers", "cache_utils.DynamicLayer") from None
    return DynamicLayer
