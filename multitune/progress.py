"""Progress of a long step: tqdm's bar (with ETA) on a terminal; where the output is a file or a
pipe, a plain line every `every` seconds instead (tqdm would write one endless line of carriage
returns into a log file)."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class _Lines:
    """tqdm's calls used here, printed as periodic lines: `train: 40/500 (8%) 9.8 s/it, eta 75 min | ...`."""

    def __init__(self, total: int, initial: int, desc: str, every: float, file):
        self.total, self.n, self.desc, self.every, self.file = total, initial, desc, every, file
        self.start, self.start_n, self.last = time.monotonic(), initial, float("-inf")
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            done = self.n - self.start_n
            rate = (now - self.start) / done if done else float("nan")
            eta = rate * (self.total - self.n) / 60 if done else float("nan")
            pct = 100 * self.n / max(self.total, 1)
            line = f"{self.desc}: {self.n}/{self.total} ({pct:.0f}%) {rate:.1f} s/it, eta {eta:.0f} min"
            print(line + (f" | {self.postfix}" if self.postfix else ""), file=self.file, flush=True)

    def set_postfix(self, values: dict, refresh: bool = True) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, initial: int = 0, enabled: bool = True, every: float = 60.0, file=None):
    """A progress bar on a terminal, periodic lines elsewhere, nothing when not `enabled`."""
    file = file or sys.stderr
    if enabled and not file.isatty():
        return _Lines(total, initial, desc, every, file)
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc=desc, file=file)
