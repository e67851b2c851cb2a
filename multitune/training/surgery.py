"""Gradient surgery: combine per-task gradients into one update direction.

Every function here takes the matrix ``G`` of per-task gradients, shape ``(K, P)`` (K tasks, P
flattened trainable parameters, one row per task as built by `per_task_grads`), and returns one
direction of shape ``(P,)`` to write into ``p.grad`` with `write_grad` before ``optimizer.step()``.

Scale convention: every function returns a direction on the **sum scale**, the scale of
``G.sum(0)``, which is the gradient of the summed task losses (the ``equal`` balancer of
`multitune.training.loss_weighting`). Concretely, when tasks do not conflict:

* `pcgrad` returns exactly ``G.sum(0)`` when no pair of rows has a negative inner product;
* `cagrad` with ``c = 0`` returns exactly ``G.sum(0)`` (the reference code returns the mean; we
  multiply by K). With ``c > 0`` it is on the sum scale only roughly: CAGrad always moves beyond
  the mean gradient, e.g. K equal-norm orthogonal (or identical) gradients give
  ``(1 + c) / (1 + c^2) * G.sum(0)``, 1.21 x the sum for the default c = 0.4;
* `aligned_mtl` returns ``G.sum(0)`` when the rows are orthogonal with equal norms;
* `mgda` and `imtl_g` return ``G.sum(0)`` when the rows are identical, or orthogonal with equal norms.

Switching between plain training and surgery therefore needs no learning-rate change.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from multitune.errors import MultituneError

# Relative tolerance for the CAGrad solver and the Gram-matrix rank test (float32 gradients).
_F32_EPS = float(torch.finfo(torch.float32).eps)


def per_task_grads(task_losses: list[torch.Tensor], params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Gradient of each task's loss w.r.t. ``params``, flattened and stacked to ``(K, P)`` float32.

    The losses come from one forward over a batch whose rows each belong to one task, so the graph
    is shared: each ``autograd.grad`` call retains it for the next task (K backward passes, one
    forward). A parameter a task does not reach, or a loss without a graph (a task absent from the
    batch, given as a constant), contributes zeros. ``p.grad`` is not touched.
    """
    if not params:
        raise ValueError("per_task_grads needs at least one parameter")
    sizes = [p.numel() for p in params]
    device = params[0].device
    rows = []
    for loss in task_losses:
        if not loss.requires_grad:
            rows.append(torch.zeros(sum(sizes), dtype=torch.float32, device=device))
            continue
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat = [
            torch.zeros(n, dtype=torch.float32, device=device) if g is None else g.reshape(-1).float()
            for g, n in zip(grads, sizes, strict=True)
        ]
        rows.append(torch.cat(flat))
    if not rows:
        return torch.zeros(0, sum(sizes), dtype=torch.float32, device=device)
    return torch.stack(rows)


def write_grad(params: list[torch.nn.Parameter], g: torch.Tensor) -> None:
    """Unflatten ``g`` (P,) into ``p.grad`` of each parameter, replacing (not adding to) it.

    Each ``p.grad`` is a fresh tensor in the parameter's dtype, never a view of ``g``.
    """
    total = sum(p.numel() for p in params)
    if g.dim() != 1 or g.numel() != total:
        raise ValueError(f"write_grad: gradient has shape {tuple(g.shape)}, expected ({total},)")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = g[offset : offset + n].detach().reshape(p.shape).to(device=p.device, dtype=p.dtype).clone()
        offset += n


def _check_grads(G: torch.Tensor) -> None:
    if G.dim() != 2 or G.shape[0] < 1:
        raise ValueError(f"task gradients must have shape (K, P) with K >= 1; got {tuple(G.shape)}")


def _pcgrad_rows(G: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad's projected per-task gradients, shape ``(K, P)``; `pcgrad` sums them."""
    _check_grads(G)
    k = G.shape[0]
    sq_norms = (G * G).sum(1)
    projected = G.clone()
    for i in range(k):
        others = [j for j in range(k) if j != i]
        order = torch.randperm(len(others), generator=generator).tolist()
        g_i = projected[i]
        for idx in order:
            j = others[idx]
            dot = torch.dot(g_i, G[j])
            if dot < 0:  # a zero g_j gives dot == 0: nothing to remove
                g_i -= (dot / sq_norms[j]) * G[j]
    return projected


def pcgrad(G: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"), sum scale.

    For each task i, the other tasks j are visited in a random order; whenever the (partially
    projected) g_i conflicts with the *original* g_j (g_i . g_j < 0), the component of g_i along
    g_j is removed: g_i <- g_i - (g_i . g_j / |g_j|^2) g_j. The projected gradients are **summed**,
    as in the paper's reference implementation, so with no conflicting pair the result is exactly
    ``G.sum(0)``, the gradient of the summed loss. ``generator`` drives the random orders (the
    global torch RNG when None); with K = 2 the order does not matter.
    """
    return _pcgrad_rows(G, generator).sum(0)


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (Duchi et al. 2008, sort-based)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    ks = np.arange(1, v.size + 1)
    rho = np.nonzero(u - css / ks > 0)[0][-1]
    theta = css[rho] / (rho + 1.0)
    return np.maximum(v - theta, 0.0)


def _cagrad_weights(gram: np.ndarray, c: float, iterations: int = 1000) -> np.ndarray:
    """Minimise F(w) = w^T A b + c |g0| sqrt(w^T A w) over the simplex, A = G G^T, b = 1/K.

    This is the dual of CAGrad (Liu et al. 2021, eq. 5), solved in the reference code with scipy's
    SLSQP. F is convex; we use projected gradient descent with a backtracking step size, which is
    deterministic and needs no scipy. A is scaled to unit mean diagonal first (F scales linearly
    with A, so the minimiser does not change), and sqrt gets a tiny smoothing term as in the
    reference (``+ 1e-8``) so F stays differentiable where G^T w = 0.
    """
    k = gram.shape[0]
    scale = float(np.mean(np.diag(gram)))
    a = gram / scale
    b = np.full(k, 1.0 / k)
    ab = a @ b
    radius = c * math.sqrt(max(float(b @ ab), 0.0))  # c * |g0| in the scaled units
    smooth = 1e-10

    def value(w: np.ndarray) -> float:
        return float(w @ ab + radius * math.sqrt(max(float(w @ a @ w), 0.0) + smooth))

    def gradient(w: np.ndarray) -> np.ndarray:
        aw = a @ w
        return ab + radius * aw / math.sqrt(max(float(w @ aw), 0.0) + smooth)

    return _minimise_on_simplex(value, gradient, b.copy(), iterations)


def _minimise_on_simplex(
    value: Callable[[np.ndarray], float], gradient: Callable[[np.ndarray], np.ndarray], w: np.ndarray, iterations: int
) -> np.ndarray:
    """Projected gradient descent on {w >= 0, sum w = 1} with a backtracking step size (deterministic)."""
    f = value(w)
    step = 1.0
    for _ in range(iterations):
        grad = gradient(w)
        while True:
            candidate = _project_simplex(w - step * grad)
            diff = candidate - w
            f_new = value(candidate)
            if f_new <= f + float(grad @ diff) + float(diff @ diff) / (2.0 * step) or step < 1e-12:
                break
            step *= 0.5
        if float(np.abs(diff).max()) < 1e-12:
            break
        w, f = candidate, f_new
        step *= 2.0
    return w


def cagrad(G: torch.Tensor, c: float = 0.4) -> torch.Tensor:
    """CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning"), sum scale.

    CAGrad looks for the direction d within a ball around the mean gradient g0, |d - g0| <= c |g0|,
    that maximises the worst task's improvement min_i g_i . d. Its dual, as in the reference code
    (github.com/Cranial-XIX/CAGrad, ``cagrad``): with A = G G^T and |g0| = sqrt(mean(A)), find w
    on the simplex minimising w^T A (1/K) + c |g0| sqrt(w^T A w); then g_w = w^T G and
    d = g0 + c |g0| / |g_w| * g_w, rescaled by 1 / (1 + c^2) (the reference's ``rescale=1``).

    The reference returns that d on the scale of the MEAN gradient; this function multiplies it by
    K so that, like the other functions here, it is on the SUM scale: with ``c = 0`` it returns
    exactly ``G.sum(0)``; with c > 0 and no conflict it can be up to (1 + c) / (1 + c^2) times that.
    """
    _check_grads(G)
    if not (isinstance(c, (int, float)) and math.isfinite(c)) or c < 0:
        raise MultituneError(f"cagrad c must be a finite number >= 0; got {c!r}")
    k = G.shape[0]
    g0 = G.mean(0)
    if c == 0:
        return g0 * k
    g64 = G.double()
    gram = (g64 @ g64.T).cpu().numpy()
    if float(np.mean(np.diag(gram))) <= 0.0:  # every task gradient is zero
        return torch.zeros_like(g0)
    w = torch.from_numpy(_cagrad_weights(gram, float(c))).to(device=G.device)
    gw = w @ g64
    gw_norm = float(gw.norm())
    g0_norm = math.sqrt(max(float(np.mean(gram)), 0.0))
    d = g64.mean(0)
    if gw_norm > _F32_EPS * math.sqrt(float(np.max(np.diag(gram)))):
        d = d + (c * g0_norm / gw_norm) * gw
    return (d * (k / (1.0 + c * c))).to(G.dtype)


def aligned_mtl(G: torch.Tensor) -> torch.Tensor:
    """Aligned-MTL (Senushkin et al. 2023, "Independent Component Alignment for Multi-Task Learning").

    Conflicts and dominance show up as a badly conditioned gradient system. Aligned-MTL replaces the
    task gradients by the closest (Procrustes) set of orthogonal gradients that all have the norm
    sqrt(lambda_min), where lambda_min is the smallest nonzero eigenvalue of the Gram matrix
    M = G G^T = V diag(lambda) V^T. In closed form the aligned gradients are B G with
    B = sqrt(lambda_min) V diag(lambda)^(-1/2) V^T (rank-r parts only), and the update is their
    sum, ``B.sum(0) @ G``, as in the reference (SamsungLabs/MTL, also LibMTL).

    Sum scale: for orthogonal rows of equal norm B = I and the result is ``G.sum(0)``; duplicated
    rows also give ``G.sum(0)``; two exactly opposite rows cancel to zero.
    """
    _check_grads(G)
    g64 = G.double()
    gram = g64 @ g64.T
    lmbda, vectors = torch.linalg.eigh(gram)
    if float(lmbda.max()) <= 0.0:
        return torch.zeros(G.shape[1], dtype=G.dtype, device=G.device)
    tol = float(lmbda.max()) * G.shape[0] * _F32_EPS
    keep = lmbda > tol
    lmbda, vectors = lmbda[keep], vectors[:, keep]
    b = lmbda.min().sqrt() * (vectors * lmbda.rsqrt()) @ vectors.T
    alpha = b.sum(0)
    return (alpha @ g64).to(G.dtype)


def mgda(G: torch.Tensor) -> torch.Tensor:
    """MGDA (Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization"), sum scale.

    The min-norm point of the convex hull of the task gradients, d = w^T G with w on the simplex
    minimising |w^T G|^2: a direction along which no task's loss rises (g_i . d >= |d|^2 for every
    task), which shrinks towards zero as the tasks approach a Pareto-stationary point. Gradients are
    not normalised first (LibMTL's default). The convex combination is multiplied by K, so that
    identical rows, or orthogonal rows of equal norm, give exactly ``G.sum(0)``.
    """
    _check_grads(G)
    k = G.shape[0]
    g64 = G.double()
    gram = (g64 @ g64.T).cpu().numpy()
    scale = float(np.mean(np.diag(gram)))
    if scale <= 0.0:  # every task gradient is zero
        return torch.zeros(G.shape[1], dtype=G.dtype, device=G.device)
    a = gram / scale  # the minimiser does not depend on the scale; the step size does
    w = _minimise_on_simplex(lambda w: float(w @ a @ w), lambda w: 2.0 * (a @ w), np.full(k, 1.0 / k), 1000)
    return (torch.from_numpy(w).to(G.device) @ g64 * k).to(G.dtype)


def imtl_g(G: torch.Tensor) -> torch.Tensor:
    """IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning"), sum scale.

    The combination d = sum_i alpha_i g_i, sum alpha = 1, whose projections on every task's unit
    gradient u_i are equal (d . u_i the same for all i): no task is favoured, whatever the norms of
    the gradients. Closed form as in the paper and LibMTL: with D = rows g_1 - g_i and U = rows
    u_1 - u_i (i = 2..K), alpha_{2..K} = g_1 U^T (D U^T)^+ and alpha_1 = 1 - sum alpha_{2..K}; the
    pseudo-inverse (LibMTL: the inverse) keeps duplicated rows well defined. Multiplied by K:
    identical rows, or orthogonal rows of equal norm, give exactly ``G.sum(0)``.
    """
    _check_grads(G)
    k = G.shape[0]
    g64 = G.double()
    if k == 1:
        return G[0].clone()
    units = g64 / g64.norm(dim=1, keepdim=True).clamp_min(1e-30)
    d, u = g64[:1] - g64[1:], units[:1] - units[1:]
    rest = (g64[0] @ u.T) @ torch.linalg.pinv(d @ u.T)
    alpha = torch.cat([1.0 - rest.sum().reshape(1), rest])
    return (alpha @ g64 * k).to(G.dtype)


SURGERY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "pcgrad": pcgrad,
    "cagrad": cagrad,
    "aligned_mtl": aligned_mtl,
    "mgda": mgda,
    "imtl_g": imtl_g,
}


def surgery_direction(surgery, grads: torch.Tensor, step: int) -> torch.Tensor:
    """Surgery on the coordinates that two or more tasks reach; the others (task-specific experts
    or adapters, parameters one task alone moves) keep their plain sum."""
    direction = grads.sum(0)
    shared = (grads != 0).sum(0) > 1
    if shared.any():
        direction[shared] = surgery(grads[:, shared], step)
    return direction


def add_grad(params: list[torch.nn.Parameter], flat: torch.Tensor, scale: float) -> None:
    """Add `scale * flat` (P,) into the parameters' .grad (accumulates over micro-batches)."""
    offset = 0
    for p in params:
        piece = flat[offset : offset + p.numel()].view_as(p).to(p.dtype) * scale
        p.grad = piece if p.grad is None else p.grad + piece
        offset += p.numel()
