"""Multi-task sampling: which (task, example index) pairs go into each training batch.

Two independent sources of randomness keep the sequence reproducible and cheap to checkpoint:

* the *task choice* for every draw comes from one numpy Generator seeded from ``seed``; its
  bit-generator state is what a checkpoint stores;
* the *example order* inside a task is a permutation of ``range(n_k)`` that is recomputed from
  ``(seed, k, epoch)`` whenever it is needed, so a checkpoint only stores an epoch number and a
  position per task, never the permutation itself.

Every example of a task is therefore seen exactly once per epoch of that task, whatever the
mixing strategy, and resuming from ``state_dict()`` continues the exact same sequence.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from multitune.errors import MultituneError

STRATEGIES = ("proportional", "temperature", "uniform", "weights")

_STATE_VERSION = 1


def mixture_probabilities(
    sizes: dict[str, int],
    strategy: str,
    temperature: float = 2.0,
    weights: dict[str, float] | None = None,
) -> dict[str, float]:
    """Return the probability of drawing each task, in the order of ``sizes``.

    Strategies exist because plain proportional mixing lets large tasks drown small ones:

    * ``proportional``: p_i ∝ n_i (every example equally likely, big tasks dominate);
    * ``temperature``: p_i ∝ n_i ** (1/T) (T > 1 flattens towards uniform, T = 1 is proportional);
    * ``uniform``: p_i = 1/k (every task equally often, small tasks repeat many epochs);
    * ``weights``: p_i ∝ weights[i] (explicit control; a weight of 0 switches a task off).

    ``temperature`` is only checked for the temperature strategy and ``weights`` only for the
    weights strategy, so a config may carry defaults it does not use.
    """
    if strategy not in STRATEGIES:
        raise MultituneError(f"unknown mixing strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
    if not sizes:
        raise MultituneError("task mixture needs at least one task; got no tasks")
    for name, size in sizes.items():
        if int(size) != size or size < 1:
            raise MultituneError(f"task {name!r} has size {size}; every task needs at least one example")

    names = list(sizes)
    n = np.array([sizes[name] for name in names], dtype=np.float64)

    if strategy == "proportional":
        raw = n
    elif strategy == "temperature":
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (temperature <= 0):
            raise MultituneError(f"mixing temperature must be a finite number > 0; got {temperature!r}")
        raw = n ** (1.0 / temperature)
    elif strategy == "uniform":
        raw = np.ones_like(n)
    else:  # weights
        raw = np.array(_checked_weights(names, weights), dtype=np.float64)

    probs = raw / raw.sum()
    return {name: float(p) for name, p in zip(names, probs, strict=True)}


def _checked_weights(names: list[str], weights: dict[str, float] | None) -> list[float]:
    """Weights in task order, after rejecting anything that cannot form a distribution."""
    if weights is None:
        raise MultituneError("mixing strategy 'weights' needs weights for every task; got none")
    unknown = [w for w in weights if w not in names]
    if unknown:
        raise MultituneError(
            f"mixing weights name unknown task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(names)}"
        )
    missing = [name for name in names if name not in weights]
    if missing:
        raise MultituneError(
            f"mixing weights missing for task(s) {', '.join(map(repr, missing))}; every task needs a weight >= 0"
        )
    values = []
    for name in names:
        w = weights[name]
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise MultituneError(f"mixing weight for task {name!r} must be a number; got {w!r}")
        if w < 0:
            raise MultituneError(f"mixing weight for task {name!r} is negative ({w}); use >= 0")
        values.append(float(w))
    if sum(values) <= 0:
        raise MultituneError("mixing weights sum to 0; at least one task needs a weight > 0")
    return values


def _json_safe(value: Any) -> Any:
    """Turn numpy scalars/arrays inside a (nested) bit-generator state into plain Python."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


class TaskMixture:
    """Hands out (task, example index) pairs for training batches, resumably.

    Each draw picks a task with ``probabilities`` and takes that task's next index from its
    current epoch's permutation; an exhausted task starts its next epoch with a fresh one.
    """

    def __init__(
        self,
        sizes: dict[str, int],
        strategy: str = "proportional",
        temperature: float = 2.0,
        weights: dict[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        self.probabilities: dict[str, float] = mixture_probabilities(sizes, strategy, temperature, weights)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise MultituneError(f"mixing seed must be an integer >= 0; got {seed!r}")
        self._seed = int(seed)
        self._names = list(sizes)
        self._sizes = [int(sizes[name]) for name in self._names]
        self._p = np.array([self.probabilities[name] for name in self._names], dtype=np.float64)
        self._rng = np.random.default_rng(self._seed)
        self._epochs = [0] * len(self._names)
        self._positions = [0] * len(self._names)
        self._draws = 0
        self._perms: list[np.ndarray | None] = [None] * len(self._names)

    @property
    def draws(self) -> int:
        """How many (task, index) pairs have been handed out so far."""
        return self._draws

    def _permutation(self, k: int) -> np.ndarray:
        """Task k's order for its current epoch; derived from the seed so it is never saved."""
        perm = self._perms[k]
        if perm is None:
            rng = np.random.default_rng([self._seed, k, self._epochs[k]])
            perm = rng.permutation(self._sizes[k])
            self._perms[k] = perm
        return perm

    def next_batch(self, batch_size: int) -> list[tuple[str, int]]:
        """The next ``batch_size`` (task name, example index) pairs of the sequence."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise MultituneError(f"batch size must be an integer >= 1; got {batch_size!r}")
        if batch_size < 1:
            raise MultituneError(f"batch size must be an integer >= 1; got {batch_size}")
        choices = self._rng.choice(len(self._names), size=int(batch_size), p=self._p)
        batch = []
        for k in choices.tolist():
            perm = self._permutation(k)
            batch.append((self._names[k], int(perm[self._positions[k]])))
            self._positions[k] += 1
            if self._positions[k] == self._sizes[k]:
                self._epochs[k] += 1
                self._positions[k] = 0
                self._perms[k] = None
        self._draws += len(batch)
        return batch

    def state_dict(self) -> dict:
        """Everything needed to continue the exact same sequence; plain JSON types only."""
        return {
            "version": _STATE_VERSION,
            "tasks": list(self._names),
            "sizes": list(self._sizes),
            "epochs": list(self._epochs),
            "positions": list(self._positions),
            "draws": self._draws,
            "rng": _json_safe(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict``), which must describe the same tasks.

        Strategy and seed are not checked: they come from this object's constructor, which is
        expected to be built from the same config as the one that saved the state.
        """
        tasks = list(state.get("tasks", []))
        if tasks != self._names:
            raise MultituneError(f"mixture state is for tasks {tasks}, but this mixture has tasks {self._names}")
        sizes = [int(s) for s in state.get("sizes", [])]
        if sizes != self._sizes:
            raise MultituneError(f"mixture state is for task sizes {sizes}, but this mixture has sizes {self._sizes}")
        epochs = [int(e) for e in state["epochs"]]
        positions = [int(p) for p in state["positions"]]
        if len(epochs) != len(tasks) or len(positions) != len(tasks):
            raise MultituneError("mixture state has epochs/positions for the wrong number of tasks")
        for name, pos, size in zip(tasks, positions, sizes, strict=True):
            if not 0 <= pos < size:
                raise MultituneError(f"mixture state position {pos} for task {name!r} is outside 0..{size - 1}")
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        self._rng = rng
        self._epochs = epochs
        self._positions = positions
        self._draws = int(state["draws"])
        self._perms = [None] * len(tasks)
