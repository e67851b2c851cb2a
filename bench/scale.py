"""Throughput of one run on 1 and 2 processes, and the communication share of a step.

    python bench/scale.py                          # the bundled model, CPU: 2 processes x 1 thread vs 1 x 1
    python bench/scale.py --steps 10 --batch 8     # global batch 8 rows in both (4 per process with 2)

Trains examples/demo.yaml's tasks for --steps steps with the same global batch in one process
(one thread) and in two processes (torchrun, one thread each; Accelerate's CPU mode, gloo, unless
a GPU is there), no evaluation, and reads rows/s from each run's results.json. The communication
share is the time of one all-reduce of the run's trainable parameters (what DDP sends each step),
timed in the two processes, over the two-process run's time per step. On a GPU machine the same
command compares 1 and 2 GPUs (`--processes` for more).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, argv: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    import torch

    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable]
    if processes > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_port())]
    subprocess.run([*cmd, *argv], check=True, env=env, cwd=ROOT)


def allreduce_ms(numel: int, repeats: int = 20) -> None:
    """(in each of the processes) the median time of an all-reduce of `numel` float32 values."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
    x = torch.ones(numel, device=device)
    times = []
    for _ in range(repeats + 2):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(json.dumps({"allreduce_ms": 1000 * sorted(times[2:])[repeats // 2]}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="global batch in rows")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--allreduce", type=int, help=argparse.SUPPRESS)  # the worker's own mode
    args = parser.parse_args()
    if args.allreduce:
        allreduce_ms(args.allreduce)
        return
    out = Path(tempfile.mkdtemp(prefix="scale-"))
    rows = {}
    for processes in (1, args.processes):
        overrides = [
            f"output={out / f'p{processes}'}",
            f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch // processes}",
            "train.threads=1",
            "train.log_every=1000",
            "eval.zero_shot=false",
            *(f"tasks.{t}.max_eval_examples=1" for t in ("sst2", "ag_news", "rte")),
        ]
        _launch(processes, ["-m", "multitune", "train", "examples/demo.yaml", *overrides])
        rows[processes] = json.loads((out / f"p{processes}" / "results.json").read_text())["train"]
    shutil.rmtree(out)  # the bench's own scratch runs
    # what DDP sends each step: the trainable parameters' gradients
    numel = rows[1]["trainable_parameters"]
    print(f"timing an all-reduce of {numel:,} values in {args.processes} processes", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes)]
        + ["--master_addr", "127.0.0.1", "--master_port", str(_port()), __file__, "--allreduce", str(numel)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ms = json.loads(done.stdout.strip().splitlines()[-1])["allreduce_ms"]
    one, many = rows[1], rows[args.processes]
    step_ms = 1000 * many["seconds"] / many["steps"]
    print(f"\nglobal batch {args.batch} rows, {args.steps} steps, one thread per process, no evaluation\n")
    print("| processes | rows/s | speed-up | efficiency | ms/step |")
    print("|---:|---:|---:|---:|---:|")
    for n, r in ((1, one), (args.processes, many)):
        speed, ms_step = r["rows_per_s"] / one["rows_per_s"], 1000 * r["seconds"] / r["steps"]
        print(f"| {n} | {r['rows_per_s']:.2f} | {speed:.2f}x | {100 * speed / n:.0f}% | {ms_step:.0f} |")
    print(f"\nall-reduce of the gradients: {ms:.1f} ms, {100 * ms / step_ms:.1f}% of a {args.processes}-process step")


if __name__ == "__main__":
    main()
