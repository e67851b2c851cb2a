"""What single training optimisations contribute, one at a time, on the batches of bench/throughput.py.

- `layout`: forward + backward of the bench's four 8-row batches packed into 512-token
  sequences (first fit), into the length `pack` chooses (fewest cells) up to 512, and up to
  2048 (what training does on a CPU: one sequence per step); same rows, same LoRA model,
  alternating batch by batch, 2 rounds;
- `allocator`: the chosen layout in two fresh processes, glibc's default allocator against
  `multitune.runtime.keep_freed_memory`;
- `fused`: forward + backward of the chosen layout with PEFT's LoRA forward against
  `FusedLoraLinear` (the update added inside the GEMM), alternating batch by batch, 2 rounds;
- `dropout`: `nn.Dropout` against `WordDropout` on a (tokens x d_in) activation of that size, and
  the random words of one mask from torch's CPU generator against `random_words`;
- `attention`: forward + backward of the chosen layout with transformers' "sdpa" attention
  (key/value heads repeated) against `multitune_sdpa` (grouped heads to the kernel), alternating
  batch by batch, 2 rounds;
- `blocks`: forward + backward of the chosen layout with each layer's attention in one kernel
  call against query blocks that see only the keys their rows may see (`blocked_attention`),
  alternating batch by batch, 2 rounds;
- `compile`: forward + backward of the chosen layout with the decoder layers eager against
  compiled (`train.compile`), alternating batch by batch after the compilation, 2 rounds;
- `gated-layout`: forward + backward of the bench's four batches on cgc_lora (the quality
  study's: 2 common experts + 1 per task, count gate, rank 16 in all) packed with one task per
  sequence (task ids per sequence) against all of a step's rows in one sequence (task ids per
  token), alternating batch by batch, 2 rounds;
- `profile`: where the time of one step goes (`torch.profiler`, the first batch after a warm-up):
  matmuls, attention, dropout's random words, the rest; and the GFLOP/s of the model's GEMMs and
  of the rank-16 LoRA products against the matmul peak measured in the same run.

    python bench/parts.py --data DIR            # all nine parts
    python bench/parts.py --data DIR --part dropout
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the same rows, LoRA and lengths as the throughput bench)

DATA = {"dir": ""}  # --data, set by main()


def _model_and_batches(keep_memory: bool, method: dict | None = None):
    from multitune.config import validate_config
    from multitune.methods import apply_method
    from multitune.models.base import load_base_model
    from multitune.runtime import keep_freed_memory

    if keep_memory:
        keep_freed_memory()
    args = argparse.Namespace(
        data=DATA["dir"],
        model="smollm2-135m-instruct",
        rank=16,
        rows_per_task=2000,
        steps=4,
        batch=8,
        max_length=512,
        tmp="/tmp",
    )
    rows, tok = throughput.drawn_rows(args)
    raw = throughput.run_config(args, "parts")
    cfg = validate_config({**raw, "method": {**raw["method"], **(method or {})}})
    model = apply_method(load_base_model(args.model), cfg.method, cfg.tasks).train()
    steps = [rows[i * args.batch : (i + 1) * args.batch] for i in range(args.steps)]
    return model, steps, tok


def _seconds(model, batches) -> float:
    from multitune.methods.task_context import task_context
    from multitune.models.forward import target_logprobs

    t0 = time.perf_counter()
    for b in batches:
        with task_context(b.context_ids()):  # read by task-gated layers only
            logp, _ = target_logprobs(model, b)
            (-logp.mean()).backward()
    return time.perf_counter() - t0


def _pack(steps, tok, length: int = 2048, first_fit: bool = False):
    """The bench's steps packed as training packs them on a CPU (2048-token sequences), or into
    `length`-token sequences; with `first_fit`, filled in order without the length choice."""
    from multitune.data import collate

    real = collate._capacity
    if first_fit:  # the layout before the length choice: first fit into `length`-token sequences
        collate._capacity = lambda lengths, groups, limit: limit
    try:
        return [collate.pack(s, tok.pad_token_id, length) for s in steps]
    finally:
        collate._capacity = real


def _best_per_layout(model, layouts: dict[str, list]) -> dict[str, float]:
    """Seconds of forward + backward of each layout's batches: the best of 2 rounds per batch,
    summed, the layouts alternating batch by batch (the machine's speed drifts), after a warm-up."""
    first = next(iter(layouts.values()))
    _seconds(model, first[:1])  # warm-up
    best = {k: [float("inf")] * len(first) for k in layouts}
    for _ in range(2):
        for i in range(len(first)):
            for k, batches in layouts.items():
                best[k][i] = min(best[k][i], _seconds(model, [batches[i]]))
    return {k: sum(times) for k, times in best.items()}


def layout() -> None:
    model, steps, tok = _model_and_batches(keep_memory=True)
    layouts = {
        "first fit, 512": _pack(steps, tok, 512, first_fit=True),
        "fewest cells, 512": _pack(steps, tok, 512),
        "fewest cells, 2048": _pack(steps, tok),
    }
    best = _best_per_layout(model, layouts)
    for k, batches in layouts.items():
        cells = sum(b.input_ids.numel() for b in batches)
        shapes = [tuple(b.input_ids.shape) for b in batches]
        print(f"[layout] {k}: sequences {shapes}, {cells} cells, {best[k]:.1f} s (best per batch)")
    for a, b in itertools.pairwise(layouts):
        print(f"[layout] {a} -> {b}: {best[a] / best[b]:.2f}x")


def allocator() -> None:
    out = {}
    for keep in (False, True):
        res = subprocess.run(
            [sys.executable, __file__, "--data", DATA["dir"], "--child-allocator", str(int(keep))],
            capture_output=True,
            text=True,
            check=True,
        )
        out[keep] = json.loads(res.stdout.strip().splitlines()[-1])["seconds"]
        print(f"[allocator] {'keep_freed_memory' if keep else 'glibc defaults'}: best {out[keep]:.1f} s")
    print(f"[allocator] speed-up {out[False] / out[True]:.2f}x")


def _allocator_child(keep: bool) -> None:
    model, steps, tok = _model_and_batches(keep_memory=keep)
    chosen = _pack(steps, tok)
    _seconds(model, chosen)  # warm-up
    print(json.dumps({"seconds": min(_seconds(model, chosen) for _ in range(2))}))


def _alternate(part: str, model, batches, arms: dict) -> None:
    """Forward + backward of each batch under each arm ({name: function that switches the model to
    it}), alternating batch by batch, 2 rounds; prints the best time per batch summed, and the
    speed-up of the second arm over the first."""
    _seconds(model, batches[:1])  # warm-up
    best = {name: [float("inf")] * len(batches) for name in arms}
    for _ in range(2):
        for i, batch in enumerate(batches):
            for name, switch in arms.items():
                switch()
                best[name][i] = min(best[name][i], _seconds(model, [batch]))
    for name in arms:
        print(f"[{part}] {name}: {sum(best[name]):.1f} s for the {len(batches)} batches (best per batch)")
    first, second = (sum(best[name]) for name in arms)
    print(f"[{part}] speed-up {first / second:.2f}x")


def fused() -> None:
    from peft.tuners.lora.layer import Linear

    from multitune.methods.lora.layer import FusedLoraLinear

    model, steps, tok = _model_and_batches(keep_memory=True)
    layers = [m for m in model.modules() if isinstance(m, Linear)]

    def use(cls):
        for layer in layers:
            layer.__class__ = cls

    arms = {"PEFT forward": lambda: use(Linear), "FusedLoraLinear": lambda: use(FusedLoraLinear)}
    _alternate("fused", model, _pack(steps, tok), arms)


def attention() -> None:
    from multitune.models.attention import NAME

    model, steps, tok = _model_and_batches(keep_memory=True)
    arms = {
        "transformers sdpa (repeat_kv)": lambda: model.set_attn_implementation("sdpa"),
        "grouped sdpa": lambda: model.set_attn_implementation(NAME),
    }
    _alternate("attention", model, _pack(steps, tok), arms)


def blocks() -> None:
    from multitune.models import attention

    model, steps, tok = _model_and_batches(keep_memory=True)
    default = attention.QUERY_BLOCK

    def use(block: int):
        attention.QUERY_BLOCK = block

    arms = {"one call per layer": lambda: use(10**9), f"blocks of {default} queries": lambda: use(default)}
    _alternate("blocks", model, _pack(steps, tok), arms)


def compile_() -> None:
    from torch._dynamo.utils import counters

    from multitune.runtime import compile_layers

    model, steps, tok = _model_and_batches(keep_memory=True)
    batches = _pack(steps, tok)
    compile_layers(model)
    blocks = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    compiled = [b._compiled_call_impl for b in blocks]

    def use(on: bool):
        for block, impl in zip(blocks, compiled, strict=True):
            block._compiled_call_impl = impl if on else None

    t0 = time.perf_counter()
    _seconds(model, batches[:2])  # compiles (dynamic shapes: the second length reuses the graph)
    print(f"[compile] first two batches, compilation included: {time.perf_counter() - t0:.1f} s")
    print(f"[compile] graph breaks: {sum(counters['graph_break'].values())}")
    _alternate("compile", model, batches, {"eager": lambda: use(False), "compiled": lambda: use(True)})


def gated_layout() -> None:
    from multitune.data.collate import pack

    study_cgc = {"name": "cgc_lora", "common_experts": 2, "task_experts": 1, "gate_norm": "count"}
    model, steps, tok = _model_and_batches(keep_memory=True, method=study_cgc)
    layouts = {
        "one task per sequence": [pack(s, tok.pad_token_id, 2048, by_task=True) for s in steps],
        "tasks mixed, ids per token": [pack(s, tok.pad_token_id, 2048) for s in steps],
    }
    best = _best_per_layout(model, layouts)
    for k, batches in layouts.items():
        cells = sum(b.input_ids.numel() for b in batches)
        tokens = sum(int((b.row_ids >= 0).sum()) for b in batches)
        shapes = [tuple(b.input_ids.shape) for b in batches]
        print(
            f"[gated-layout] {k}: sequences {shapes}, {cells} cells ({1 - tokens / cells:.1%} padding), "
            f"{best[k]:.1f} s (best per batch)"
        )
    by_task, mixed = (best[k] for k in layouts)
    print(f"[gated-layout] speed-up {by_task / mixed:.2f}x")


def profile() -> None:
    from torch.profiler import profile as torch_profile

    model, steps, tok = _model_and_batches(keep_memory=True)
    batch = _pack(steps, tok)[:1]
    _seconds(model, batch)  # warm-up
    with torch_profile(record_shapes=True) as prof:
        _seconds(model, batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = {
        "matmul": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"),
        "attention": tuple(f"aten::_scaled_dot_product_flash_attention_for_cpu{s}" for s in ("", "_backward")),
        "dropout random words": ("aten::random_", "random_words"),
    }
    shape = tuple(batch[0].input_ids.shape)
    for name, ops in groups.items():
        part = sum(e.self_cpu_time_total for e in events if e.key in ops)
        print(f"[profile] {name}: {100 * part / total:.1f}% of a {shape[0]} x {shape[1]} step")
    covered = sum(e.self_cpu_time_total for e in events if any(e.key in ops for ops in groups.values()))
    print(f"[profile] the rest (element-wise, copies, autograd): {100 * (total - covered) / total:.1f}%")
    rest = sorted(
        (e for e in events if not any(e.key in ops for ops in groups.values())), key=lambda e: -e.self_cpu_time_total
    )
    print("[profile]   of which " + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.1f}%" for e in rest[:8]))
    # the rate of the 2-D matmuls: the model's own GEMMs against the LoRA products (one side = rank)
    rates = {"model GEMMs": [0.0, 0.0], "rank-16 LoRA products": [0.0, 0.0]}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ("aten::mm", "aten::addmm_") and e.self_cpu_time_total:
            (m, k), (_, n) = e.input_shapes[0 if e.key == "aten::mm" else 1 :][:2]
            kind = "rank-16 LoRA products" if 16 in (m, k, n) else "model GEMMs"
            rates[kind][0] += 2 * m * k * n * e.count
            rates[kind][1] += e.self_cpu_time_total / 1e6
    for kind, (flop, seconds) in rates.items():
        print(f"[profile] {kind}: {flop / seconds / 1e9:.1f} GFLOP/s, {100 * seconds * 1e6 / total:.1f}% of the step")
    print(f"[profile] matmul peak measured now: {throughput.matmul_peak_gflops():.1f} GFLOP/s")


def dropout() -> None:
    from multitune.methods.dropout import WordDropout, random_words
    from multitune.runtime import keep_freed_memory

    keep_freed_memory()  # as in training
    x = torch.randn(1605, 1536, requires_grad=True)  # the first step's tokens x down_proj's d_in
    arms = {"nn.Dropout": torch.nn.Dropout(0.05).train(), "WordDropout": WordDropout(0.05).train()}

    def clock(fn, n=10):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3

    fwd = {name: float("inf") for name in arms}
    both = dict(fwd)
    for _ in range(5):  # arms alternate; the best of 5 repeats
        for name, layer in arms.items():
            with torch.no_grad():
                fwd[name] = min(fwd[name], clock(lambda layer=layer: layer(x)))
            both[name] = min(both[name], clock(lambda layer=layer: layer(x).sum().backward()))
    for name in arms:
        print(f"[dropout] {name}: forward {fwd[name]:.1f} ms, forward + backward {both[name]:.1f} ms")
    print(
        f"[dropout] WordDropout speed-up: forward {fwd['nn.Dropout'] / fwd['WordDropout']:.1f}x, "
        f"forward + backward {both['nn.Dropout'] / both['WordDropout']:.1f}x"
    )
    count = 1605 * 576 // 4  # the words of one mask on a d_in = 576 input
    generators = {
        "torch (mt19937)": lambda: torch.randint(-(2**63), 2**63 - 1, (count,), dtype=torch.int64),
        "random_words (SFC64)": lambda: random_words(count, x.device),
    }
    best = {name: min(clock(fn, 50) for _ in range(5)) for name, fn in generators.items()}
    for name, ms in best.items():
        print(f"[dropout] {count} random words, {name}: {ms:.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of the full data sets (one sub-folder per task)")
    p.add_argument("--part", choices=list(PARTS), action="append")
    p.add_argument("--child-allocator", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    DATA["dir"] = args.data
    if args.child_allocator is not None:
        _allocator_child(bool(args.child_allocator))
        return
    for part in args.part or list(PARTS):
        PARTS[part]()


PARTS = {
    "dropout": dropout,
    "fused": fused,
    "attention": attention,
    "blocks": blocks,
    "compile": compile_,
    "profile": profile,
    "gated-layout": gated_layout,
    "allocator": allocator,
    "layout": layout,
}


if __name__ == "__main__":
    main()
