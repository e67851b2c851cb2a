"""What speed depends on besides the math: threads, the allocator, compilation.

`use_cores` is called once by the command line (every command); benches call it too, so they
measure what a user gets. The library changes no process-wide setting: `threads` sets the thread
count a config asks for (`train.threads`) for one call and puts it back.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

import torch

from multitune._compat import without_compiled_calls

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def use_cores(threads: int | None = None) -> None:
    """All cores (or `threads`) for intra-op work, and freed memory kept for reuse."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    keep_freed_memory()


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """`torch.set_num_threads(count)` inside the block, the previous count after it (None: as is)."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def keep_freed_memory() -> None:
    """Keep freed blocks in the process instead of handing them back to the kernel.

    A training step allocates and frees the same activation buffers (megabytes each) every
    step. glibc's defaults serve blocks above a sliding threshold with mmap and return freed
    memory at the top of the heap to the kernel, so every step page-faults the same memory back
    in (zeroed by the kernel). Serving blocks up to 32 MiB from the heap and not trimming it
    took forward + backward of four packed LoRA batches on the bundled model from 29.0 to 26.6 s
    (`python bench/throughput.py` measures training end to end). The resident set stays at its
    peak, which training reaches anyway; a process that starts others afterwards should start
    them first. A no-op off glibc (macOS, musl) and for CUDA memory.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim (mallopt(3))
    mallopt(_M_TOP_PAD, 256 << 20)


def compile_layers(model: torch.nn.Module) -> int:
    """`torch.compile` every repeated block of the model (the decoder layers) in place.

    Compiling the blocks rather than the whole model compiles one graph that all layers share
    (seconds, not minutes) and leaves mask building, the LM head and the loss eager. Shapes are
    marked dynamic: packed batches change length every step. Returns the number of blocks.
    """
    blocks = max(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len({type(c) for c in m}) == 1),
        key=len,
        default=None,
    )
    if blocks is None or len(blocks) == 0:
        return 0
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


@contextlib.contextmanager
def eager_layers(model: torch.nn.Module) -> Iterator[None]:
    """Run the blocks `compile_layers` compiled eagerly inside this block (evaluation during and
    after training).

    Evaluation calls the layers as training never does: without gradients, with a KV cache that
    grows by one token per call. Each is a new graph to dynamo, which recompiled up to its limit
    of 8 per layer (tens of seconds on the bundled model), printed a warning, and ran them eagerly
    anyway; the predictions are the same either way."""
    with without_compiled_calls(model):
        yield
