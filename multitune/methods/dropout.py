"""Dropout with a cheaper random mask, swapped in for a model's `nn.Dropout` layers (the
adapters' above all) when a method is applied.

LoRA-style layers drop elements of their input (tokens x d_in) before the down-projection. On a
CPU the mask costs more than the matmul it feeds: `nn.Dropout` draws one random number per
element through `bernoulli_`, and on the bundled model with dropout 0.05 those draws were 15% of
a training step. Here every 64-bit random word gives four 16-bit uniforms, so the generator
runs a quarter as often; an element is kept when its uniform is at least round(p x 2^16), a drop
probability within 2^-17 of p. Kept elements are scaled by 1 / (1 - p) as in `nn.Dropout`.
"""

from __future__ import annotations

import torch
from torch import nn

_LEVELS = 1 << 16


class WordDropout(nn.Dropout):
    """`nn.Dropout` (same p, scaling and train/eval behaviour) with a mask cut from 64-bit words."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        uniforms = words.view(torch.int16)[:n].view(x.shape)  # 4 per word, uniform on [-2^15, 2^15)
        keep = uniforms >= round(self.p * _LEVELS) - _LEVELS // 2
        return x * keep * (1.0 / (1.0 - self.p))


def use_word_dropout(model: nn.Module) -> int:
    """Replace every `nn.Dropout` of the model by a `WordDropout` of the same p; returns how many."""
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, WordDropout(child.p, child.inplace))
                swapped += 1
    return swapped
