"""Forgetting control: keep fine-tuned weights close to the pre-trained ones (L2-SP).

Plain weight decay pulls weights towards 0, which for a pre-trained model means towards
*forgetting*; Li, Grandvalet & Davoine (2018), "Explicit Inductive Bias for Transfer Learning
with Convolutional Networks" (ICML), show that decaying towards the starting point instead
(L2-SP) is a better default for transfer: the pre-trained solution is the prior, and the new
task only moves the weights as far as its data justifies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from multitune.errors import MultituneError

__all__ = ["L2SP"]


def _check_coefficient(name: str, value: object) -> float:
    """A finite, non-negative penalty coefficient as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise MultituneError(f"L2-SP {name} must be a finite number >= 0; got {value!r}")
    return float(value)


class L2SP:
    """The L2-SP penalty ``alpha/2 * sum ||theta - theta0||^2 + beta/2 * sum ||theta_new||^2``.

    Li et al. (2018): ``theta0`` are the pre-trained values of the trainable parameters,
    snapshotted when this object is built (detached clones, same device and dtype: one extra
    copy of the trainable weights in memory). Parameters that did not exist in the pre-trained
    model (a new classification head, say) have no meaningful starting point; name them with
    ``exclude`` and they get the plain L2 term ``beta/2 * ||theta||^2`` instead (skipped when
    ``beta`` is 0), as in the paper.

    Which parameters count is decided here, once: those with ``requires_grad`` at construction.
    Build it from the freshly loaded base model *before* any update and before loading a resume
    checkpoint into the model: ``theta0`` must be the pre-trained weights, never resumed ones
    (nothing of it is saved in checkpoints; it is reloaded from the base model).

    Use with ``full`` or partial (``freeze``) fine-tuning. With LoRA or adapters the pre-trained
    weights are frozen and the trainable ones are new, so there is nothing for L2-SP to anchor
    (the caller rejects that combination). Tied parameters passed twice are counted once.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        alpha: float,
        beta: float = 0.0,
        exclude: Callable[[str], bool] | None = None,
    ) -> None:
        self.alpha = _check_coefficient("alpha", alpha)
        self.beta = _check_coefficient("beta", beta)
        self._anchored: list[tuple[str, nn.Parameter, Tensor]] = []
        self._new: list[tuple[str, nn.Parameter]] = []
        seen: set[int] = set()
        for name, param in named_params:
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if exclude is not None and exclude(name):
                self._new.append((name, param))
            else:
                self._anchored.append((name, param, param.detach().clone()))
        if not self._anchored and not self._new:
            raise MultituneError(
                "L2-SP found no trainable parameters (all have requires_grad=False); nothing to regularise"
            )

    @property
    def anchored_names(self) -> tuple[str, ...]:
        """Parameters pulled towards their pre-trained values (for logging what L2-SP covers)."""
        return tuple(name for name, _, _ in self._anchored)

    @property
    def new_names(self) -> tuple[str, ...]:
        """Excluded parameters: plain L2 with ``beta`` when ``beta`` > 0, otherwise untouched."""
        return tuple(name for name, _ in self._new)

    def penalty(self) -> Tensor:
        """The penalty as a differentiable scalar; add it to the loss once per optimizer step.

        Its gradient is ``alpha * (theta - theta0)`` for anchored parameters and ``beta * theta``
        for excluded ones, in the parameters' dtype. The sum is float32 (float64 if a parameter
        is) and is gathered on the first parameter's device (models split across devices work).
        """
        anchored = [param for _, param, _ in self._anchored]
        starts = [start for _, _, start in self._anchored]
        new = [param for _, param in self._new]
        device = (anchored or new)[0].device
        total = torch.zeros((), dtype=torch.float32, device=device)
        if self.alpha > 0 and anchored:
            total = total + _HalfSquaredDistance.apply(self.alpha, len(anchored), *anchored, *starts)
        if self.beta > 0 and new:
            total = total + _HalfSquaredDistance.apply(self.beta, len(new), *new)
        return total


class _HalfSquaredDistance(torch.autograd.Function):
    """``coef/2 * sum_i ||p_i - a_i||^2`` (``a_i = 0`` when no anchors are given), memory-lean.

    Plain autograd would keep every float32 difference alive until backward: a float32 copy of
    all trainable weights (twice a bf16 model). Here forward keeps only references and backward
    recomputes ``coef * (p - a)`` one tensor at a time.
    Inputs: ``coef, n, p_1..p_n`` then optionally ``a_1..a_n``.
    """

    @staticmethod
    def forward(ctx, coef: float, n: int, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        ctx.coef, ctx.n = coef, n
        ctx.save_for_backward(*tensors)
        params, anchors = tensors[:n], tensors[n:]
        device = params[0].device
        total = torch.zeros((), dtype=torch.float32, device=device)
        for i, param in enumerate(params):
            diff = param - anchors[i] if anchors else param
            # at least float32 (bf16 sums are coarse); float64 parameters keep float64
            total = total + diff.to(torch.promote_types(diff.dtype, torch.float32)).square().sum().to(device)
        return total * (0.5 * coef)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        tensors = ctx.saved_tensors
        params, anchors = tensors[: ctx.n], tensors[ctx.n :]
        scale = grad_output * ctx.coef  # a 0-dim tensor: the product keeps the parameter's dtype
        grads = []
        for i, param in enumerate(params):
            diff = param - anchors[i] if anchors else param
            grads.append(diff * scale.to(param.device))
        return (None, None, *grads, *([None] * len(anchors)))
