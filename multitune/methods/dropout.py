"""Dropout with a cheaper random mask, swapped in for a model's `nn.Dropout` layers (the
adapters' above all) when a method is applied.

LoRA-style layers drop elements of their input (tokens x d_in) before the down-projection. On a
CPU the mask costs more than the matmul it feeds: `nn.Dropout` draws one random number per
element through `bernoulli_`, and on the bundled model with dropout 0.05 those draws were 15% of
a training step. Here every 64-bit random word gives four 16-bit uniforms, so the generator
runs a quarter as often; an element is kept when its uniform is at least round(p x 2^16), a drop
probability within 2^-17 of p. Kept elements are scaled by 1 / (1 - p) as in `nn.Dropout`.

On a CPU the words come from numpy's SFC64 generator, seeded by one draw from torch's
generator, so `torch.manual_seed` still fixes every mask: torch's CPU generator (mt19937) took
1.36 ms for the 231,120 words of one 1,605 x 576 mask, SFC64 0.92 ms (`bench/parts.py --part
dropout`). Elsewhere torch draws them (Philox on CUDA, fast already).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_LEVELS = 1 << 16


class WordDropout(nn.Dropout):
    """`nn.Dropout` (same p, scaling and train/eval behaviour) with a mask cut from 64-bit words."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * self._keep(x).mul_(1.0 / (1.0 - self.p))

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x with the dropped elements zeroed, not yet scaled; the scale 1 / (1 - p)): a linear
        layer that follows can fold the scale into its own multiply (see methods/lora/layer.py)."""
        if not self.training or self.p == 0.0:
            return x, 1.0
        return x * self._keep(x), 1.0 / (1.0 - self.p)

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        return keep_mask(x.detach(), torch.randint(0, 2**63 - 1, (1,)), self.p)


@torch.library.custom_op("multitune::keep_mask", mutates_args=())
def keep_mask(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """1 where an element of x is kept, 0 where it is dropped, in x's dtype and shape. Written by
    the comparison itself: a bool mask costs a conversion pass in the multiply and in its
    backward (together, on a CPU, ten times the multiply).

    An operator of its own so that `torch.compile` (`train.compile`) keeps it in the graph as one
    call instead of breaking the graph at the numpy draw: every LoRA layer has a dropout, and the
    breaks left little to fuse. The seed (one int64 from torch's generator) is an input, drawn
    by the caller: two masks of one input then differ in an argument and are never merged as
    the same call."""
    n = x.numel()
    words = random_words((n + 3) // 4, x.device, int(seed))
    uniforms = words.view(torch.int16)[:n].view(x.shape)  # 4 per word, uniform on [-2^15, 2^15)
    keep = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.ge(uniforms, round(p * _LEVELS) - _LEVELS // 2, out=keep)


@keep_mask.register_fake
def _(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def random_words(count: int, device: torch.device, seed: int | None = None) -> torch.Tensor:
    """`count` uniformly random int64 words on `device`; on a CPU from `seed` (default: drawn
    from torch's generator)."""
    if device.type != "cpu":
        return torch.randint(-(2**63), 2**63 - 1, (count,), dtype=torch.int64, device=device)
    with torch.profiler.record_function("random_words"):  # numpy's time shows in profiles under this name
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, (1,)))
        return torch.from_numpy(np.random.SFC64(seed).random_raw(count).view(np.int64))


def drop_unscaled(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(dropout(x) without its 1 / (1 - p) scaling, that scale): for a layer that folds the scale
    into a multiply it does anyway. Any other module is applied as it is, with scale 1."""
    if isinstance(dropout, WordDropout):
        return dropout.masked(x)
    return dropout(x), 1.0


def use_word_dropout(model: nn.Module) -> int:
    """Replace every `nn.Dropout` of the model by a `WordDropout` of the same p; returns how many."""
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, WordDropout(child.p, child.inplace))
                swapped += 1
    return swapped
