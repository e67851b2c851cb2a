"""Target-module presets: `attention` and `mlp` name the linear layers of those blocks in any
Hugging Face decoder, by where they sit rather than by their names (GPT-2's `c_proj` exists in
both blocks, so a list of names cannot express "attention only")."""

from __future__ import annotations

import re

from torch import nn

from multitune.errors import MultituneError

PRESETS = {
    "attention": re.compile(r"\.(self_attn|attn|attention|self_attention)\."),
    "mlp": re.compile(r"\.(mlp|feed_forward|ffn)\."),
}


def resolve_targets(model: nn.Module, targets: str | list[str]) -> str | list[str]:
    """PEFT's `target_modules` for our targets: presets become full module names."""
    if isinstance(targets, list) or targets not in PRESETS:
        return targets
    pattern = PRESETS[targets]
    names = [name for name, module in model.named_modules() if _is_linear(module) and pattern.search(f".{name}")]
    if not names:
        raise MultituneError(f"targets '{targets}': no linear layer of this model sits in such a block")
    return names


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's linear layers
