"""Full and partial fine-tuning (the transfer-learning baselines): no new parameters, only a
choice of which of the model's own parameters train."""

from __future__ import annotations

import re

from transformers import PreTrainedModel

from multitune.config import FreezeMethod
from multitune.errors import MultituneError


def apply_full(model: PreTrainedModel) -> PreTrainedModel:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def apply_freeze(model: PreTrainedModel, cfg: FreezeMethod) -> PreTrainedModel:
    """Train the last `last_layers` decoder blocks and the parameters matching `modules`."""
    patterns = [re.compile(m) for m in cfg.modules]
    layer_prefixes = _last_layer_prefixes(model, cfg.last_layers)
    chosen = 0
    for name, p in model.named_parameters():
        train = any(name.startswith(pre) for pre in layer_prefixes) or any(pat.search(name) for pat in patterns)
        p.requires_grad_(train)
        chosen += train
    if chosen == 0:
        raise MultituneError(f"method freeze: modules {cfg.modules} match no parameter of the model")
    return model


def _last_layer_prefixes(model: PreTrainedModel, n: int) -> list[str]:
    if n == 0:
        return []
    n_layers = model.config.num_hidden_layers
    if n > n_layers:
        raise MultituneError(f"method freeze: last_layers={n} but the model has {n_layers} layers")
    # the decoder blocks are the ModuleList whose length is the layer count (model.layers, transformer.h ...)
    for name, module in model.named_modules():
        if module.__class__.__name__ == "ModuleList" and len(module) == n_layers:
            return [f"{name}.{i}." for i in range(n_layers - n, n_layers)]
    raise MultituneError("method freeze: could not find the decoder layers of this model")
