"""Atomic checkpoints and exact resume.

A checkpoint is a folder `checkpoints/step-00000120/` holding the trainable weights only
(safetensors), the optimizer and scheduler states, the task sampler's state, every RNG state and
the trainer's counters. It is written into a hidden temporary folder and renamed into place, so a
crash during a save leaves the previous checkpoint untouched and no half-written folder that
looks complete. Resuming restores all of it, so a resumed run computes the same losses as one
that was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise RuntimeError(f"{path} lacks trainable weights such as {missing[0]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_weights_atomic(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(trainable_state(model), str(tmp))
    _fsync(tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    keep: int,
    modules: dict[str, torch.nn.Module] | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "modules": {name: m.state_dict() for name, m in (modules or {}).items()},
        },
        tmp / "optimizer.pt",
    )
    (tmp / "state.json").write_text(json.dumps({"step": step, **trainer_state}))
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer, scheduler, modules: dict[str, torch.nn.Module] | None = None
) -> dict:
    """Restore weights, optimizer, scheduler, RNG and the trainer's own modules (loss balancer);
    return the trainer state (step, sampler...)."""
    load_trainable(model, path / "trainable.safetensors")
    blob = torch.load(path / "optimizer.pt", weights_only=False)
    for name, module in (modules or {}).items():
        module.load_state_dict(blob["modules"][name])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((path / "state.json").read_text())


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
