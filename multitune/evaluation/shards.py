"""Evaluation sharded over the processes of a run: each process scores every world-th row of a
task, then every process holds all the predictions in row order, so the metrics are the ones one
process computes."""

from __future__ import annotations


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the process count of a started process group (training under
    `accelerate launch` / torchrun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gathered(mine: list, n_rows: int, world: int) -> list:
    """Every process's predictions of its rows (rank r: rows r, r + world, ...) in row order."""
    if world == 1:
        return mine
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    preds: list = [None] * n_rows
    for rank, part in enumerate(parts):
        preds[rank::world] = part
    return preds
