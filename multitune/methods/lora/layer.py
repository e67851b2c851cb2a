"""PEFT's LoRA `Linear` with a cheaper forward for the plain case: the low-rank update is added
into the base output by the GEMM itself.

PEFT computes `result + lora_B(lora_A(dropout(x))) * scaling`: the B product is written to a new
(tokens x d_out) tensor, multiplied by `scaling` in a second pass and added in a third, and
dropout scales its (tokens x d_in) output in one more; backward repeats the two multiplies. With
rank 16 the B product itself is a thin GEMM, so on a CPU these element-wise passes cost more than
its arithmetic. Here `torch.addmm_` accumulates `(scaling / (1 - p)) * h @ B^T` into the base
output in place, the dropout's 1 / (1 - p) folded into that alpha (`WordDropout.masked`): the same
sum with one multiply moved, so results match PEFT's to float rounding (tested). Anything else
(merged or disabled adapters, several active adapters, DoRA and other variants, LoRA bias,
mixed-adapter batches, autocast, other base layers) goes through PEFT's forward unchanged.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear
from torch import nn
from transformers.pytorch_utils import Conv1D

from multitune._compat import become
from multitune.methods.dropout import drop_unscaled


class FusedLoraLinear(Linear):
    """A `peft.tuners.lora.layer.Linear` (same parameters, state dict, merge and save)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._plain_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        # a fresh 2-D output that autograd does not keep: safe to add into in place (adding into
        # a view of it would make autograd copy the whole gradient back in backward)
        result = self.base_layer(x)
        x, keep_scale = drop_unscaled(self.lora_dropout[name], x)
        h = nn.functional.linear(x, self.lora_A[name].weight)
        result.addmm_(h, self.lora_B[name].weight.t(), alpha=self.scaling[name] * keep_scale)
        return result.view(*shape[:-1], result.shape[-1])

    def _plain_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active vanilla LoRA adapter, or None when PEFT's own forward must run."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        return name if plain_inputs(x, self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight) else None


def plain_inputs(x: torch.Tensor, base_layer: nn.Module, *weights: torch.Tensor) -> bool:
    """What a fused forward needs (the experts' too): a base layer whose output is a fresh tensor
    to add into, no autocast, and one dtype throughout."""
    if type(base_layer) not in (nn.Linear, Conv1D) or torch.is_autocast_enabled(x.device.type):
        return False
    return len({x.dtype, base_layer.weight.dtype, *(w.dtype for w in weights)}) == 1


def fuse_lora_layers(model: nn.Module) -> int:
    """Give every PEFT LoRA `Linear` of the model the fused forward; returns how many."""
    fused = 0
    for module in model.modules():
        if type(module) is Linear:
            become(module, FusedLoraLinear)
            fused += 1
    return fused
