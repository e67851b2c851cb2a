"""Where a run ran: recorded in results.json so a reader can tell two runs' conditions apart
(date, versions of the libraries that decide the numbers, hardware, the project's git commit)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

LIBRARIES = ("multitune", "torch", "transformers", "peft", "accelerate")


def environment(device: torch.device | None = None) -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    out = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else "cpu",
        "git_commit": _git_commit(),
    }
    if device is not None and device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def _git_commit() -> str | None:
    """The commit of the multitune checkout this code runs from (None for an installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
    )
    return done.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
