"""Stopping a run without losing it: Ctrl-C / SIGTERM end the step in progress, then the loop
saves a checkpoint and leaves (`--resume` continues from it); a second signal stops at once.
A loss that is no longer finite stops the run before anything of it is saved."""

from __future__ import annotations

import signal
import threading

import torch

from multitune.errors import MultituneError


class StopSignals:
    """Catch SIGINT and SIGTERM while training (main thread only, where signals arrive).

    The first signal is remembered in `requested` and the handlers go back to what they were, so
    a second one interrupts whatever is running (a user who does not want to wait)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._catch)
        return self

    def _catch(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def check_finite_loss(row_loss: torch.Tensor, step: int, lr: float) -> None:
    if not bool(torch.isfinite(row_loss).all()):
        raise MultituneError(
            f"the training loss is not finite at step {step} (lr {lr:g}): the run stopped and saved nothing "
            "of it; earlier checkpoints are intact: lower train.lr or check the data"
        )


def check_finite_weights(params: list[torch.Tensor], step: int) -> None:
    """Before a checkpoint: weights that are inf / NaN would make it a bad one to resume from."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise MultituneError(
            f"the trainable weights are not finite after step {step}: the run stopped before saving them; "
            "earlier checkpoints are intact: lower train.lr"
        )
