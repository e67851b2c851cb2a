"""Domain-invariant representations: an adversarial domain classifier and distribution alignment.

Fine-tuning on a mixture of source domains and evaluating on another rewards features that do
not tell the domains apart (Ben-David et al. 2010: target error is bounded by source error plus a
domain divergence). Two families of penalties push the pooled hidden states that way:

* adversarial (DANN, Ganin & Lempitsky 2015, "Unsupervised Domain Adaptation by
  Backpropagation"): a small classifier predicts the domain from the pooled hidden state, and a
  gradient reversal layer (GRL) makes the encoder *maximise* that classifier's loss while the
  classifier minimises it, all in one backward pass;
* moment / kernel alignment between two batches of features: Deep CORAL (Sun & Saenko 2016)
  matches second-order statistics, MMD (Gretton et al. 2012; Long et al. 2015, DAN) matches the
  whole distribution through a kernel mean embedding.

Everything here works on pooled features of shape (N, H) and computes in at least float32,
whatever the dtype of the hidden states (bf16 covariances and kernel sums are too coarse to be
useful): losses are float32 scalars, float64 for float64 inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitune.errors import MultituneError

__all__ = [
    "ALIGNMENT",
    "DomainClassifier",
    "GradReverse",
    "coral_loss",
    "dann_lambda",
    "dann_loss",
    "grad_reverse",
    "mmd_loss",
    "pool_hidden",
]


def _wide(x: Tensor) -> Tensor:
    """``x`` in at least float32: bf16/fp16 widened, float32/float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_number(name: str, value: object, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a float after rejecting bools, non-numbers, NaN/inf and values below ``minimum``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > minimum if strict else value >= minimum):
        return float(value)
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    raise MultituneError(f"{name} must be a finite number {bound}; got {value!r}")


class GradReverse(torch.autograd.Function):
    """Identity on the way forward, gradient times -lambda on the way back (Ganin & Lempitsky 2015).

    Placed between the encoder and the domain classifier, it lets one optimizer step train the
    classifier to *recognise* the domain and, at the same time, the encoder to *hide* it: the
    classifier sees the true gradient of its loss, the encoder sees that gradient reversed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, lam: float) -> Tensor:  # type: ignore[override]
        ctx.lam = lam
        # view_as: a new tensor object (autograd needs one) that shares x's storage, no copy.
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad_output * -ctx.lam, None


def grad_reverse(x: Tensor, lam: float) -> Tensor:
    """``x`` unchanged, but gradients flowing back through it are multiplied by ``-lam``.

    ``lam`` must be finite and >= 0: 0 cuts the encoder off from the adversary (warm-up), larger
    values weigh invariance more against the task loss.
    """
    lam = _check_number("gradient reversal lambda", lam)
    return GradReverse.apply(x, lam)


def dann_lambda(progress: float, gamma: float = 10.0, max_lambda: float = 1.0) -> float:
    """The DANN warm-up schedule: ``max_lambda * (2 / (1 + exp(-gamma * p)) - 1)``.

    Ganin & Lempitsky (2015, sec. 5.2.2) start the reversal at 0 because the domain classifier
    is random early on and its (reversed) gradient is only noise for the encoder; lambda then rises
    smoothly to ``max_lambda``. ``progress`` is the fraction of training done, clamped to [0, 1].
    """
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or math.isnan(progress):
        raise MultituneError(f"training progress must be a number in [0, 1]; got {progress!r}")
    gamma = _check_number("DANN lambda gamma", gamma, strict=True)
    max_lambda = _check_number("DANN max lambda", max_lambda)
    p = min(max(float(progress), 0.0), 1.0)
    return max_lambda * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


def pool_hidden(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` (B, T, H) over the real tokens of ``mask`` (B, T, 0/1 or bool) -> (B, H).

    A sequence-level feature is what the domain classifier and the alignment losses compare;
    mean pooling over real tokens keeps padding (whose hidden states are arbitrary) out of it. Pad
    positions are zero-filled before summing, so NaN/inf there cannot leak in, and a row without
    any real token pools to zeros instead of 0/0. Sums and counts are taken in at least float32
    (a bf16 count is inexact above 256 tokens) and the result is cast back to ``hidden``'s dtype.
    """
    if hidden.dim() != 3:
        raise MultituneError(f"pool_hidden needs hidden states of shape (B, T, H); got shape {tuple(hidden.shape)}")
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise MultituneError(
            f"pool_hidden mask shape {tuple(mask.shape)} does not match the hidden states' (B, T) "
            f"= {tuple(hidden.shape[:2])}"
        )
    keep = (mask != 0).to(hidden.device)
    wide = torch.promote_types(hidden.dtype, torch.float32)
    summed = hidden.masked_fill(~keep.unsqueeze(-1), 0).sum(dim=1, dtype=wide)
    count = keep.sum(dim=1, dtype=wide).clamp_min(1.0).unsqueeze(-1)
    return (summed / count).to(hidden.dtype)


class DomainClassifier(nn.Module):
    """The DANN domain discriminator: Linear -> ReLU -> Dropout -> Linear to ``n_domains`` logits.

    One hidden layer, as in Ganin & Lempitsky (2015): a linear adversary would only make the
    features invariant to linear read-outs. ``forward`` applies the gradient reversal first, so
    the classifier can be trained with a plain cross-entropy added to the task loss. Inputs are
    cast to the classifier's dtype (hidden states may be bf16 while this head stays float32).
    """

    def __init__(self, hidden_size: int, n_domains: int, width: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        for name, value, least in (("hidden_size", hidden_size, 1), ("n_domains", n_domains, 2), ("width", width, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise MultituneError(f"domain classifier {name} must be an integer >= {least}; got {value!r}")
        if _check_number("domain classifier dropout", dropout) >= 1.0:
            raise MultituneError(f"domain classifier dropout must be in [0, 1); got {dropout!r}")
        self.hidden_size = hidden_size
        self.n_domains = n_domains
        self.net = nn.Sequential(
            nn.Linear(hidden_size, width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width, n_domains),
        )

    def forward(self, pooled: Tensor, lam: float) -> Tensor:
        """Domain logits (B, n_domains) for pooled features (B, H), reversing gradients by ``lam``."""
        if pooled.dim() != 2 or pooled.shape[1] != self.hidden_size:
            raise MultituneError(
                f"domain classifier expects pooled features of shape (B, {self.hidden_size}); got {tuple(pooled.shape)}"
            )
        x = grad_reverse(pooled, lam)
        return self.net(x.to(self.net[0].weight.dtype))


def dann_loss(classifier: DomainClassifier, pooled: Tensor, domains: Tensor, lam: float) -> tuple[Tensor, float]:
    """Cross-entropy of ``classifier`` behind the GRL on ``pooled`` (B, H), and its batch accuracy.

    The loss is simply added to the task loss: its gradient trains the classifier and, reversed
    and scaled by ``lam``, pushes the encoder towards features the classifier cannot separate.
    The accuracy is for logging: near chance (1 / n_domains for balanced batches) means the
    pooled features no longer reveal the domain; near 1 means the adversary is winning.
    Reading the accuracy synchronises with the device once.
    """
    if domains.dim() != 1 or domains.shape[0] != pooled.shape[0]:
        raise MultituneError(f"domain labels must have shape (B,) = ({pooled.shape[0]},); got {tuple(domains.shape)}")
    if domains.shape[0] == 0:
        raise MultituneError("dann_loss got an empty batch; it needs at least one example")
    if domains.dtype != torch.long:
        raise MultituneError(f"domain labels must be a LongTensor; got dtype {domains.dtype}")
    lo, hi = int(domains.min()), int(domains.max())
    if lo < 0 or hi >= classifier.n_domains:
        raise MultituneError(f"domain labels must be in [0, {classifier.n_domains - 1}]; got values from {lo} to {hi}")
    logits = _wide(classifier(pooled, lam))
    domains = domains.to(logits.device)
    loss = F.cross_entropy(logits, domains)
    accuracy = (logits.detach().argmax(dim=-1) == domains).float().mean().item()
    return loss, accuracy


def _check_pair(name: str, source: Tensor, target: Tensor) -> None:
    """Both sets must be (N, H) with the same H."""
    if source.dim() != 2 or target.dim() != 2:
        raise MultituneError(
            f"{name} needs source and target features of shape (N, H); "
            f"got {tuple(source.shape)} and {tuple(target.shape)}"
        )
    if source.shape[1] != target.shape[1]:
        raise MultituneError(f"{name} source and target feature sizes differ: {source.shape[1]} vs {target.shape[1]}")


def _zero(source: Tensor, target: Tensor) -> Tensor:
    """A scalar 0 (at least float32) that is still attached to both inputs' graphs.

    Summing an empty slice gives an exact 0 (never NaN, unlike ``0 * x`` with inf in x) whose
    backward gives zero gradients, so ``loss.backward()`` works and DDP sees the encoder used.
    """
    return _wide(source[:0]).sum() + _wide(target[:0]).sum().to(source.device)


def coral_loss(source: Tensor, target: Tensor) -> Tensor:
    """Deep CORAL (Sun & Saenko 2016): ``||C_s - C_t||_F^2 / (4 H^2)`` between feature covariances.

    ``C`` are the unbiased (n - 1) covariances of ``source`` (Ns, H) and ``target`` (Nt, H); the
    ``4 H^2`` keeps the value on the same scale across hidden sizes, as in the paper. A
    covariance needs at least two rows: with fewer on either side (a batch that happened to draw
    one example of a domain) the result is a zero still attached to both inputs' graphs,
    so it can be added to the loss and backpropagated unconditionally.
    """
    _check_pair("coral_loss", source, target)
    if source.shape[0] < 2 or target.shape[0] < 2:
        return _zero(source, target)
    h = source.shape[1]
    diff = _covariance(_wide(source)) - _covariance(_wide(target)).to(source.device)
    return diff.pow(2).sum() / (4.0 * h * h)


def _covariance(x: Tensor) -> Tensor:
    """Unbiased covariance of the rows of ``x`` (N, H) -> (H, H)."""
    centered = x - x.mean(dim=0, keepdim=True)
    return centered.T @ centered / (x.shape[0] - 1)


def mmd_loss(source: Tensor, target: Tensor, bandwidths: tuple[float, ...] = (0.5, 1, 2, 4, 8)) -> Tensor:
    """Biased MMD^2 between ``source`` (Ns, H) and ``target`` (Nt, H) under a sum of Gaussian kernels.

    ``MMD^2 = mean k(s, s') + mean k(t, t') - 2 mean k(s, t)`` (Gretton et al. 2012, the biased
    V-statistic: diagonals included, so it is >= 0 and 0 up to rounding for identical sets), with
    ``k(x, y) = sum_b exp(-||x - y||^2 / (2 (b * sigma)^2))``.

    Bandwidth choice: ``sigma`` is the median pairwise Euclidean distance over the pooled
    source+target rows (the median heuristic, Gretton et al. 2012), and a family of multiples of it
    is summed, as in DAN (Long et al. 2015), because no single bandwidth is sensitive to both
    small and large discrepancies. ``sigma`` is computed without gradient (a constant for this
    step) and is deterministic: a lower median of the off-diagonal distances; if more than half
    the pairs coincide (median 0) the mean distance is used instead. The result is a float32
    scalar (float64 for float64 inputs); its scale grows with ``len(bandwidths)`` (a sum, not an
    average, of kernels). An empty side gives a zero still attached to both inputs' graphs.
    """
    _check_pair("mmd_loss", source, target)
    if isinstance(bandwidths, (int, float)) or len(bandwidths) == 0:
        raise MultituneError(f"mmd_loss bandwidths must be a non-empty tuple of numbers > 0; got {bandwidths!r}")
    scales = [_check_number("mmd_loss bandwidth", b, strict=True) for b in bandwidths]
    ns, nt = source.shape[0], target.shape[0]
    if ns == 0 or nt == 0:
        return _zero(source, target)

    dtype = torch.promote_types(torch.promote_types(source.dtype, target.dtype), torch.float32)
    z = torch.cat([source.to(dtype), target.to(device=source.device, dtype=dtype)])
    z = z - z.mean(dim=0, keepdim=True)  # distances are shift-invariant; centring limits cancellation below
    sq = z.pow(2).sum(dim=1)
    diagonal = torch.eye(ns + nt, dtype=torch.bool, device=z.device)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0).masked_fill(diagonal, 0.0)

    with torch.no_grad():
        off = d2[~diagonal]
        median = off.median().sqrt()
        sigma = torch.where(median > 0, median, off.sqrt().mean()).clamp_min(1e-12)

    kernel = sum(torch.exp(-d2 / (2.0 * (b * sigma) ** 2)) for b in scales)
    k_ss = kernel[:ns, :ns].mean()
    k_tt = kernel[ns:, ns:].mean()
    k_st = kernel[:ns, ns:].mean()
    return k_ss + k_tt - 2.0 * k_st


ALIGNMENT: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"coral": coral_loss, "mmd": mmd_loss}
