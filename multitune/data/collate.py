"""Encoded rows -> a batch: padded (one row per sequence) or packed (several rows per sequence).

Padded: padding goes on the left so that every row's target sits at the right edge, and the
same layout serves batched generation. Position ids are passed explicitly so padding does not
shift them.

Packed: rows are laid end to end in sequences of at most `length` tokens (`train.pack_length`;
first-fit decreasing into the sequence length that leaves the fewest padding cells, see `_capacity`),
position ids restart at 0 for every row, and no attention mask is
passed: transformers then reads the row boundaries from the position ids and keeps attention
inside each row (`masking_utils.find_packed_sequence_indices`; flash-attention uses the same
position ids), so a packed row computes exactly what it computes alone. On mixed multi-task
data (short classification rows next to long QA rows) padding otherwise costs a large share of
the compute. With `by_task`, rows of different tasks never share a sequence, for task-gated
layers that read one task per sequence (bottleneck adapters, lora_experts, mtl_lora); moe_lora
and cgc_lora take one task id per token (`Batch.context_ids`) and need no such split.

Either way `row_ids` says which row each token belongs to (-1 on padding), so losses are
computed per row, whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from multitune.data.encode import IGNORE, Encoded


@dataclass
class Batch:
    input_ids: torch.Tensor  # (S, T)
    attention_mask: torch.Tensor  # (S, T): 1 on real tokens (not passed to the model when packed)
    position_ids: torch.Tensor  # (S, T)
    labels: torch.Tensor  # (S, T), IGNORE outside targets
    task_ids: torch.Tensor  # (S,): the task of each sequence
    row_ids: torch.Tensor  # (S, T): the row each token belongs to, -1 on padding
    row_task_ids: torch.Tensor  # (R,): the task of each row
    packed: bool = False
    one_task: bool = True  # every sequence holds rows of one task (task_ids says which)

    def to(self, device: torch.device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    @property
    def n_rows(self) -> int:
        return int(self.row_task_ids.shape[0])

    def context_ids(self) -> torch.Tensor:
        """The ids that `task_context` gets: each sequence's task (S,) where every sequence holds
        one task, else each token's task (S, T) (padding takes row 0's: it is loss-free and no real
        token attends to it)."""
        if self.one_task:
            return self.task_ids
        return self.row_task_ids.index_select(0, self.row_ids.clamp(min=0).flatten()).view_as(self.row_ids)

    def row_tokens(self) -> torch.Tensor:
        """Real (non-pad) tokens of each row: (R,)."""
        ids = self.row_ids[self.row_ids >= 0]
        return torch.bincount(ids, minlength=self.n_rows)


def collate(rows: list[Encoded], pad_id: int) -> Batch:
    """One row per sequence, left-padded to the longest."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, width - n :] = torch.tensor(r.input_ids)
        mask[i, width - n :] = 1
        labels[i, width - n :] = torch.tensor(r.labels)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    task_ids = torch.tensor([r.task_id for r in rows], dtype=torch.long)
    row_ids = torch.where(mask.bool(), torch.arange(len(rows))[:, None], -1)
    return Batch(ids, mask, positions, labels, task_ids, row_ids, task_ids.clone())


def pack(rows: list[Encoded], pad_id: int, length: int, by_task: bool = False) -> Batch:
    """Rows end to end in sequences of at most `length` tokens (a longer row: a sequence of its
    own), right-padded; with `by_task` a sequence holds rows of one task only."""
    lengths = [len(r.input_ids) for r in rows]
    groups = [r.task_id if by_task else 0 for r in rows]
    bins, tasks = _first_fit(lengths, groups, _capacity(lengths, groups, length))
    width = max(sum(len(rows[i].input_ids) for i in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(bins), width), dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    row_ids = torch.full((len(bins), width), -1, dtype=torch.long)
    for s, members in enumerate(bins):
        at = 0
        for i in members:
            n = len(rows[i].input_ids)
            ids[s, at : at + n] = torch.tensor(rows[i].input_ids)
            labels[s, at : at + n] = torch.tensor(rows[i].labels)
            positions[s, at : at + n] = torch.arange(n)
            mask[s, at : at + n] = 1
            row_ids[s, at : at + n] = i
            at += n
        tasks[s] = rows[members[0]].task_id
        positions[s, at:] = torch.arange(width - at)  # the padding is one more (loss-free) segment
    row_task_ids = torch.tensor([r.task_id for r in rows], dtype=torch.long)
    one_task = all(len({rows[i].task_id for i in members}) == 1 for members in bins)
    return Batch(ids, mask, positions, labels, torch.tensor(tasks), row_ids, row_task_ids, True, one_task)


def _first_fit(lengths: list[int], groups: list[int], capacity: int) -> tuple[list[list[int]], list[int]]:
    """First-fit decreasing: row indices per sequence and each sequence's group."""
    bins: list[list[int]] = []
    room: list[int] = []
    tasks: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (groups[i], -lengths[i], i)):
        n, group = lengths[i], groups[i]
        slot = next((b for b in range(len(bins)) if tasks[b] == group and room[b] >= n), None)
        if slot is None:
            bins.append([])
            room.append(max(capacity, n))
            tasks.append(group)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= n
    return bins, tasks


def _cells(lengths: list[int], groups: list[int], capacity: int) -> tuple[int, int]:
    """(sequences x width, sequences) of the first-fit layout at this capacity."""
    bins, _ = _first_fit(lengths, groups, capacity)
    return len(bins) * max(sum(lengths[i] for i in b) for b in bins), len(bins)


def _capacity(lengths: list[int], groups: list[int], length: int) -> int:
    """The sequence length whose first-fit layout has the fewest cells (tokens + padding).

    Filling `length`-token sequences leaves the last one of a step partly empty (a fifth of the
    cells of a mixed 8-row step in 512-token sequences); k shorter, evenly filled sequences carry
    the same rows with little padding. For each count k (from the fewest `length`-token sequences
    that can hold the rows) the smallest capacity that fits the rows into k sequences is found by
    bisection; the layout with the fewest cells wins (ties: the shorter sequences, cheaper
    attention).
    """
    longest, total = max(lengths), sum(lengths)
    if longest >= length:
        return length
    best = (*_cells(lengths, groups, length), length)  # (cells, sequences, capacity)
    for k in range(best[1], len(lengths) + 1):
        if k * longest >= best[0]:
            break  # k sequences at least `longest` wide cannot beat the best layout
        lo, hi = max(longest, -(-total // k)), length
        while lo < hi:  # smallest capacity with at most k sequences
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if _cells(lengths, groups, mid)[1] > k else (lo, mid)
        cells, n = _cells(lengths, groups, lo)
        if (cells, lo) < (best[0], best[2]):
            best = (cells, n, lo)
    return best[2]
