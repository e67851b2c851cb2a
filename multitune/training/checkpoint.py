"""Atomic, verified checkpoints and exact resume, with no pickle anywhere.

A checkpoint is a folder `checkpoints/step-00000120/`:

    trainable.safetensors   the trainable weights only
    state.safetensors       every tensor of the optimizer, scheduler, RNG and trainer-module states
    state.json              the rest of those states (numbers, lists, strings), tensors by reference
    manifest.json           size and SHA-256 of each file above; written last

It is written into a hidden temporary folder and renamed into place, so a crash during a save
leaves the previous checkpoint untouched and no half-written folder that looks complete. A
checkpoint is trusted only when its manifest matches its files: a truncated or edited file makes
`load_latest` fall back to the previous checkpoint with a warning. Resuming restores everything,
so a resumed run computes the same losses as one that was never interrupted.

Why not `torch.save`: its pickles run code when loaded, so a replaced checkpoint file could run
anything on `--resume`. safetensors holds tensors only and JSON holds plain values; the small
codec below (`_encode` / `_decode`) maps the nested optimizer / RNG states onto the two. No
library does this for arbitrary state trees (safetensors stores a flat dict of tensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from multitune.errors import MultituneError
from multitune.files import atomic_path

PREFIX = "step-"
WEIGHTS = "trainable.safetensors"
TENSORS = "state.safetensors"
STATE = "state.json"
MANIFEST = "manifest.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise MultituneError(f"{path} lacks trainable weights such as {missing[0]} (was it saved by another method?)")
    with torch.no_grad():
        for name, value in state.items():
            if name not in params or params[name].shape != value.shape:
                raise MultituneError(f"{path}: weight {name} does not fit this model (another method or rank?)")
            params[name].copy_(value)


def save_weights_atomic(model: torch.nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(trainable_state(model), str(tmp))
        _fsync(tmp)


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


# ----------------------------------------------------------------------------- state codec
# JSON keeps str keys, lists and plain scalars; the markers below restore what JSON would lose.


def _encode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value.copy())
        return {"__ndarray__": key, "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(value["dtype"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    keep: int,
    modules: dict[str, torch.nn.Module] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """`weights` / `optimizer_state`: given when the model's own are sharded (FSDP, gathered by
    training/sharding.py); the optimizer state is then keyed by parameter name."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)  # a save of ours that crashed
    tmp.mkdir()
    if weights is None:
        weights = trainable_state(model)
    save_file({n: t.contiguous() for n, t in weights.items()}, str(tmp / WEIGHTS))
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "trainer": {"step": step, **trainer_state},
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "modules": {name: m.state_dict() for name, m in (modules or {}).items()},
    }
    encoded = _encode(state, tensors)
    save_file(tensors, str(tmp / TENSORS))
    (tmp / STATE).write_text(json.dumps(encoded))
    manifest = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary folders are never listed; none is verified)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def verify_checkpoint(path: Path) -> str | None:
    """Why `path` cannot be trusted, or None when its files match its manifest."""
    if (path / "optimizer.pt").exists() and not (path / MANIFEST).exists():
        return "written by an older multitune as a pickle (optimizer.pt), which is never loaded"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{MANIFEST} is not valid JSON"
    for name in (WEIGHTS, TENSORS, STATE):
        entry = manifest.get(name) if isinstance(manifest, dict) else None
        f = path / name
        if not isinstance(entry, dict) or not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != entry.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {entry.get('bytes')}"
        if _sha256(f) != entry.get("sha256"):
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def load_latest(root: Path, restore: Callable[[Path], dict], warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """Restore the newest checkpoint that verifies, warning about each newer one that does not;
    None when `root` holds no checkpoint. A checkpoint that fails to restore is skipped too."""
    found = list_checkpoints(root)
    problems = []
    for path in reversed(found):
        why = verify_checkpoint(path)
        if why is None:
            try:
                return path, restore(path)
            except (SafetensorError, KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
                why = f"does not restore ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        problems.append(f"{path.name}: {why}")
        warn(f"[resume] skipping {path}: {why}")
    if found:
        raise MultituneError(f"{root}: no usable checkpoint ({'; '.join(problems)})")
    return None


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    modules: dict[str, torch.nn.Module] | None = None,
    sharded: bool = False,
) -> dict:
    """Restore weights, optimizer, scheduler, RNG and the trainer's own modules (loss balancer);
    return the trainer state (step, sampler...). Call `verify_checkpoint` first. `sharded`: the
    model is under FSDP, and the checkpoint must have been written by one (every process loads
    the whole state and keeps its shard)."""
    tensors = load_file(str(path / TENSORS))
    state = _decode(json.loads((path / STATE).read_text()), tensors)
    by_name = any(isinstance(p, str) for g in state["optimizer"]["param_groups"] for p in g["params"])
    if by_name != sharded:
        how = "with" if by_name else "without"
        raise MultituneError(f"{path} was saved {how} FSDP: resume it {how} FSDP")
    if sharded:
        from multitune.training.sharding import load_full_state  # torch.distributed only when sharded

        load_full_state(model, optimizer, load_file(str(path / WEIGHTS)), state["optimizer"])
    else:
        load_trainable(model, path / WEIGHTS)
        optimizer.load_state_dict(state["optimizer"])
    for name, module in (modules or {}).items():
        module.load_state_dict(state["modules"][name])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["trainer"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
