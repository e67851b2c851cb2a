"""FSDP2 (`accelerate launch` with `fsdp_version: 2`): each process holds a shard of every weight.

What changes for multitune when the weights are sharded:

- A forward is a collective (each FSDP unit all-gathers its weights), so it goes through the
  model's own forward, which FSDP hooks (models/forward.py), and every process must run the same
  forwards. Evaluation therefore runs inside `full_weights`: every unit gathered once and kept
  whole, so that each process scores its own shard of the dev rows with no collective.
- A sharded module's `state_dict()` holds its shards, which PEFT's and transformers'
  save_pretrained cannot write: the model is saved from the gathered whole state dict.
- Checkpoints hold the whole trainable weights and the optimizer state keyed by parameter name
  (torch's distributed state-dict helpers gather them); `--resume` loads them into the shards.
- Refused: what needs whole per-task gradients on one process (gradient surgery, interference,
  affinity) or a full copy of the weights (L2-SP's anchors); parameters beside the model's
  (`uncertainty`'s task weights), which Accelerate's FSDP2 optimizer cannot hold; and layers
  that read each row's task, since FSDP2 reduces a unit's gradients in one collective, which
  needs the same gradients present on every process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from multitune.config import RunConfig
from multitune.config.schema import BALANCE_SURGERY
from multitune.errors import MultituneError

_FULL = {"full_state_dict": True, "cpu_offload": True}


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def check_shardable(cfg: RunConfig, task_gated: bool, engine: str = "FSDP") -> None:
    """One line for each option FSDP2 (or DeepSpeed's ZeRO, whose engine owns the gradients)
    cannot run here (why: the module docstring)."""
    t = cfg.train
    refused = [
        (t.balance.method in BALANCE_SURGERY, f"train.balance={t.balance.method} combines per-task gradients"),
        (t.balance.method == "uncertainty", "train.balance=uncertainty learns task weights beside the model"),
        (t.interference_every is not None, "train.interference_every measures per-task gradients"),
        (t.affinity_every is not None, "train.affinity_every takes lookahead steps"),
        (t.l2sp is not None, "train.l2sp compares the weights with a full copy"),
        (task_gated, f"method {cfg.method.name} reads each row's task in its layers"),
    ]
    for bad, why in refused:
        if bad:
            raise MultituneError(f"{why}, which {engine} shards; run it with DDP (examples/accelerate/ddp.yaml)")


@contextmanager
def full_weights(model: torch.nn.Module, reshard_after_forward: bool) -> Iterator[None]:
    """Every FSDP unit of `model` gathered for the block (a collective on entry), kept whole
    through its forwards (so a process can run forwards the others do not), sharded again on
    exit; `reshard_after_forward` is the value training uses (the root unit keeps False, as FSDP
    sets it). A no-op for a model that is not sharded (it has no unit)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(reshard_after_forward and unit is not model, recurse=False)
            unit.reshard()


def full_weights_state(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model's state dict whole, on the CPU of the main process (empty on the others); a
    collective. A sharded module's own `state_dict()` holds its shards."""
    return get_model_state_dict(model, options=StateDictOptions(**_FULL, ignore_frozen_params=trainable_only))


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(trainable weights, optimizer state keyed by parameter name), whole, on the CPU of the
    main process (empty on the others); a collective."""
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL))
    return full_weights_state(model, trainable_only=True), optim


def load_full_weights(model: torch.nn.Module, path: Path) -> None:
    """Every process reads the whole weights file and keeps its shard."""
    set_model_state_dict(model, load_file(str(path)), options=StateDictOptions(full_state_dict=True, strict=False))


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim: dict) -> None:
    """Every process loads the whole state and keeps its shard."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=options)
