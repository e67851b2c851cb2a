"""Task loss weighting: combine per-task losses into the one scalar that is backpropagated.

A `Balancer` sees, for every micro-batch, a ``(K,)`` tensor of per-task losses (each task's mean
row loss) and a ``(K,)`` bool mask ``present``; tasks absent from the micro-batch contribute
nothing, whatever their (possibly meaningless) loss value: it is masked out before any arithmetic,
so a NaN there reaches neither the result nor the balancer's own gradients (a NaN produced by a
graph, e.g. the mean over zero rows, still poisons that graph's backward: pass a constant).

Once per optimizer step, after ``optimizer.step()``, the trainer calls ``update`` with that
step's detached per-task losses (the mean over the step's micro-batches) and the mask of tasks seen
during the step.

Scale: every balancer starts on the scale of the plain **sum** of task losses (``equal``, weight 1
per task); ``dwa`` and ``famo`` keep their weights summing to K, so changing the balancer needs no
learning-rate change. ``static`` uses the user's weights as given and ``uncertainty`` learns its
own scale. Every balancer's state is in ``state_dict()``; only ``uncertainty`` has parameters for
the main optimizer.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from multitune.errors import MultituneError


def _masked(losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``losses`` with absent tasks replaced by 0 (so NaN or inf there cannot leak into a sum)."""
    return torch.where(present, losses, torch.zeros_like(losses))


def _number(value: object, what: str, low: float, low_inclusive: bool = True, high: float = math.inf) -> float:
    """``value`` as a float in [low, high) (or (low, high)); MultituneError otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= low if low_inclusive else value > low) and value < high
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low:g}" + (f" and < {high:g}" if math.isfinite(high) else "")
        raise MultituneError(f"{what} must be a finite number {bound}; got {value!r}")
    return float(value)


class Balancer(torch.nn.Module, ABC):
    """Base class: combines per-task losses into one scalar; see the module docstring.

    Subclasses set ``needs_task_grads`` (False for every loss weighting here: they need only the
    losses, never per-task gradients).
    """

    needs_task_grads: bool = False

    def __init__(self, task_names: list[str]) -> None:
        super().__init__()
        names = list(task_names)
        if not names:
            raise MultituneError("a loss balancer needs at least one task; got no tasks")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise MultituneError(f"loss balancer task names must be unique; repeated: {', '.join(duplicates)}")
        self.task_names: list[str] = names

    def _check(self, losses: torch.Tensor, present: torch.Tensor) -> None:
        k = len(self.task_names)
        if tuple(losses.shape) != (k,) or tuple(present.shape) != (k,) or present.dtype != torch.bool:
            raise ValueError(
                f"balancer expects ({k},) losses and a ({k},) bool mask; "
                f"got {tuple(losses.shape)} and {tuple(present.shape)} {present.dtype}"
            )

    @abstractmethod
    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The scalar to backpropagate for one micro-batch."""

    def update(self, losses: torch.Tensor, present: torch.Tensor) -> None:
        """Called once per optimizer step, after ``optimizer.step()``; default: nothing to learn."""

    @abstractmethod
    def weights(self) -> dict[str, float]:
        """Current per-task weights, for logging."""


class EqualBalancer(Balancer):
    """Weight 1 per task: the sum over present tasks of each task's mean row loss.

    Note this is not the mean over all rows of the batch: a task with few rows in the batch counts
    as much as a task with many (how often each task is sampled is the mixer's job).
    """

    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        self._check(losses, present)
        return _masked(losses, present).sum()

    def weights(self) -> dict[str, float]:
        return {name: 1.0 for name in self.task_names}


class StaticBalancer(Balancer):
    """Fixed user weights: sum over present tasks of w_k * L_k (w_k >= 0, one per task)."""

    def __init__(self, task_names: list[str], weights: dict[str, float] | None = None) -> None:
        super().__init__(task_names)
        if not isinstance(weights, dict) or not weights:
            raise MultituneError(f"static loss weights need a weight for every task ({', '.join(self.task_names)})")
        unknown = [t for t in weights if t not in self.task_names]
        if unknown:
            raise MultituneError(
                f"static loss weights name unknown task(s) {', '.join(map(repr, unknown))}; "
                f"known tasks: {', '.join(self.task_names)}"
            )
        missing = [t for t in self.task_names if t not in weights]
        if missing:
            raise MultituneError(f"static loss weights missing for task(s) {', '.join(map(repr, missing))}")
        values = [_number(weights[t], f"static loss weight for task {t!r}", 0.0) for t in self.task_names]
        self.register_buffer("task_weights", torch.tensor(values, dtype=torch.float32))

    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        self._check(losses, present)
        return (_masked(losses, present) * self.task_weights.to(losses)).sum()

    def weights(self) -> dict[str, float]:
        return {name: float(w) for name, w in zip(self.task_names, self.task_weights, strict=True)}


class UncertaintyBalancer(Balancer):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018, CVPR).

    Each task has a learnable log-variance s_k = log sigma_k^2 (init 0). We use the paper's
    classification (softmax / cross-entropy) form, eq. 10 with s = log sigma^2:
    L = sum_k exp(-s_k) L_k + s_k / 2. Its minimum over s_k is at exp(-s_k) = 1 / (2 L_k), so a task
    with a larger loss is down-weighted. The s_k are ``parameters()``: the trainer must put them in
    its optimizer. The combined loss can be negative; that is expected.
    """

    def __init__(self, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.log_vars = torch.nn.Parameter(torch.zeros(len(self.task_names)))

    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        self._check(losses, present)
        s = self.log_vars.to(losses.dtype)
        terms = torch.exp(-s) * _masked(losses, present) + 0.5 * s  # mask first: 0 * NaN would poison s's grad
        return _masked(terms, present).sum()

    def weights(self) -> dict[str, float]:
        w = torch.exp(-self.log_vars.detach())
        return {name: float(v) for name, v in zip(self.task_names, w, strict=True)}


class DWABalancer(Balancer):
    """Dynamic Weight Average (Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning with Attention").

    w_k = K * softmax(r_k / T), r_k = L_k(t-1) / L_k(t-2): a task whose loss went down more slowly
    (larger ratio) gets more weight. The paper uses epoch-average losses; we use an exponential
    moving average of the step losses, e_k <- beta e_k + (1 - beta) L_k (the first record sets e_k),
    and r_k is the ratio of the average after a task's latest record to the average before it.
    This ratio is a smoothed per-step descent rate, so it stays near 1 and the weights near 1
    unless losses move quickly (lower T sharpens them). Weights are 1 until every task has two
    records; tasks absent from a step keep their averages.
    """

    def __init__(self, task_names: list[str], temperature: float = 2.0, beta: float = 0.9) -> None:
        super().__init__(task_names)
        self.temperature = _number(temperature, "dwa temperature", 0.0, low_inclusive=False)
        self.beta = _number(beta, "dwa beta", 0.0, high=1.0)
        k = len(self.task_names)
        self.register_buffer("ema_before", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("ema_last", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("records", torch.zeros(k, dtype=torch.long))

    def _weights(self) -> torch.Tensor:
        k = len(self.task_names)
        if bool((self.records < 2).any()):
            return torch.ones(k, dtype=torch.float64)
        ratio = self.ema_last / self.ema_before.clamp_min(1e-12)
        return k * torch.softmax(ratio / self.temperature, dim=0)

    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        self._check(losses, present)
        return (_masked(losses, present) * self._weights().to(losses)).sum()

    @torch.no_grad()
    def update(self, losses: torch.Tensor, present: torch.Tensor) -> None:
        self._check(losses, present)
        current = losses.detach().to(device=self.ema_last.device, dtype=torch.float64)
        mask = present.to(self.ema_last.device)
        ema = torch.where(self.records > 0, self.beta * self.ema_last + (1.0 - self.beta) * current, current)
        self.ema_before.copy_(torch.where(mask, self.ema_last, self.ema_before))
        self.ema_last.copy_(torch.where(mask, ema, self.ema_last))
        self.records.add_(mask.long())

    def weights(self) -> dict[str, float]:
        return {name: float(w) for name, w in zip(self.task_names, self._weights(), strict=True)}


class FAMOBalancer(Balancer):
    """FAMO (Liu et al. 2023, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS).

    Task logits xi (K,) give weights z = softmax(xi). The loss, as in the reference code
    (github.com/Cranial-XIX/FAMO, ``get_weighted_loss``), is
    ``sum_k z_k log(D_k) / c`` with D_k = L_k - L*_k + 1e-8 and c = sum_k z_k / D_k (detached), so
    each task's gradient gets weight (z_k / D_k) / c: the weights sum to 1. We multiply by the
    number of present tasks so the weights sum to K like ``equal`` (a constant factor), and restrict
    the softmax to the present tasks. The lower bounds L*_k are 0 (cross-entropy losses).

    ``update`` adapts xi so that all tasks' log-losses decrease at the same rate: with
    delta_k = log D_k(previous update) - log D_k(this update), the gradient of softmax(xi) applied
    to delta is fed to Adam (lr ``w_lr``, L2 weight decay ``gamma``), which raises the weight of the
    task whose loss decreases slowest. In our loop ``update`` gets each step's losses after
    ``optimizer.step()`` (no extra forward, unlike the paper's algorithm), so delta spans one
    optimizer step made with the previous weights. The first call only records the losses; a task
    contributes to delta only when it was seen in this step and at some earlier update (its last
    seen loss is kept).

    xi and the Adam moments are buffers, not parameters: they are learned here, never by the main
    optimizer, yet ``state_dict()`` holds all of it and round trips exactly.
    """

    _betas = (0.9, 0.999)
    _eps = 1e-8

    def __init__(self, task_names: list[str], w_lr: float = 0.025, gamma: float = 0.001) -> None:
        super().__init__(task_names)
        self.w_lr = _number(w_lr, "famo w_lr", 0.0, low_inclusive=False)
        self.gamma = _number(gamma, "famo gamma", 0.0)
        k = len(self.task_names)
        self.register_buffer("xi", torch.zeros(k, dtype=torch.float32))
        self.register_buffer("exp_avg", torch.zeros(k, dtype=torch.float32))
        self.register_buffer("exp_avg_sq", torch.zeros(k, dtype=torch.float32))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("prev_loss", torch.zeros(k, dtype=torch.float32))
        self.register_buffer("prev_seen", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("min_losses", torch.zeros(k, dtype=torch.float32))

    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        self._check(losses, present)
        n_present = int(present.sum())
        if n_present == 0:
            return _masked(losses, present).sum()
        logits = self.xi.to(losses).masked_fill(~present, -math.inf)
        z = torch.softmax(logits, dim=0)
        d = _masked(losses - self.min_losses.to(losses), present) + 1e-8
        c = (z / d).sum().detach()
        terms = d.log() * z / c
        return _masked(terms, present).sum() * n_present

    @torch.no_grad()
    def update(self, losses: torch.Tensor, present: torch.Tensor) -> None:
        self._check(losses, present)
        current = losses.detach().to(device=self.xi.device, dtype=torch.float32)
        mask = present.to(self.xi.device)
        valid = mask & self.prev_seen
        if bool(valid.any()):
            log_prev = (self.prev_loss - self.min_losses + 1e-8).log()
            log_curr = (_masked(current, mask) - self.min_losses + 1e-8).log()
            delta = torch.where(valid, log_prev - log_curr, torch.zeros_like(log_prev))
            with torch.enable_grad():
                xi = self.xi.detach().clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(F.softmax(xi, dim=0), xi, grad_outputs=delta)
            self._adam_step(grad)
        self.prev_loss.copy_(torch.where(mask, current, self.prev_loss))
        self.prev_seen |= mask

    def _adam_step(self, grad: torch.Tensor) -> None:
        """One step of torch.optim.Adam (weight decay as L2, no amsgrad) on xi, inline."""
        beta1, beta2 = self._betas
        grad = grad + self.gamma * self.xi
        self.adam_steps += 1
        t = int(self.adam_steps)
        self.exp_avg.lerp_(grad, 1.0 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias1 = 1.0 - beta1**t
        bias2 = 1.0 - beta2**t
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(self._eps)
        self.xi.addcdiv_(self.exp_avg, denom, value=-self.w_lr / bias1)

    def weights(self) -> dict[str, float]:
        w = len(self.task_names) * torch.softmax(self.xi, dim=0)
        return {name: float(v) for name, v in zip(self.task_names, w, strict=True)}


BALANCERS: dict[str, type[Balancer]] = {
    "equal": EqualBalancer,
    "static": StaticBalancer,
    "uncertainty": UncertaintyBalancer,
    "dwa": DWABalancer,
    "famo": FAMOBalancer,
}


def make_balancer(name: str, task_names: list[str], **options: object) -> Balancer:
    """Build the balancer called ``name``; unknown names or options are user errors."""
    if name not in BALANCERS:
        raise MultituneError(f"unknown loss balancer {name!r}; valid balancers: {', '.join(BALANCERS)}")
    cls = BALANCERS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "task_names")]
    unknown = [o for o in options if o not in accepted]
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise MultituneError(
            f"loss balancer {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; valid options: {valid}"
        )
    return cls(task_names, **options)
