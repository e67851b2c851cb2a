"""Two processes train one run: torchrun with Accelerate's CPU mode (gloo) on a tiny model, against
the same run in one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import write_yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multitune(argv: list[str], processes: int, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_port())]
    cmd = [*(launcher if processes > 1 else [sys.executable]), "-m", "multitune", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=cwd)


def _lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    """The same run (lora, 4 steps, dev eval at 2 and 4) in one process with batch 8 and in two
    processes with batch 4 each."""
    from conftest import task_rte, task_sst2

    root = tmp_path_factory.mktemp("ddp")
    runs = {}
    for processes, batch in ((1, 8), (2, 4)):
        raw = {
            "model": str(tiny_model_dir),
            "method": {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
            "tasks": [task_sst2(), task_rte()],
            "mixing": {"strategy": "temperature", "temperature": 2.0},
            "train": {"max_steps": 4, "batch_size": batch, "lr": 1e-2, "max_length": 96, "log_every": 1},
            "eval": {"max_new_tokens": 6, "batch_size": 8, "zero_shot": True},
            "output": str(root / f"p{processes}"),
        }
        raw["train"].update(eval_every=2, seed=0)
        done = _multitune(["train", str(write_yaml(root / f"p{processes}.yaml", raw))], processes, root)
        assert done.returncode == 0, done.stderr[-4000:]
        runs[processes] = (root / f"p{processes}", done)
    return runs


def test_two_processes_are_two_and_speak_once(pair):
    run, done = pair[2]
    results = json.loads((run / "results.json").read_text())
    assert results["train"]["processes"] == 2  # not one process started twice
    assert done.stdout.count("[train] 4 steps x 8 rows") == 1 and done.stdout.count("| **mean** |") == 1


def test_the_processes_stay_in_step_and_log_every_row(pair):
    one, two = _lines(pair[1][0]), _lines(pair[2][0])
    train_two = [r for r in two if r["split"] == "train" and "rank_spread" in r]
    assert [r["step"] for r in train_two] == [1, 2, 3, 4] and all(r["rank_spread"] == 0.0 for r in train_two)
    key = lambda r: (r["step"], r["split"], r.get("task"))  # noqa: E731
    two_by = {key(r): r for r in two}
    for rec in one:
        if rec["split"] not in ("train", "dev"):
            continue
        other = two_by[key(rec)]
        for name in ("rows", "tokens", "accuracy", "mean"):
            assert rec.get(name) == other.get(name), (rec, other)
        if "loss" in rec:
            assert other["loss"] == pytest.approx(rec["loss"], rel=1e-5, abs=1e-6), (rec, other)


def test_same_weights_and_same_results_as_one_process(pair):
    a = load_file(str(pair[1][0] / "model" / "adapter_model.safetensors"))
    b = load_file(str(pair[2][0] / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    one, two = (json.loads((pair[p][0] / "results.json").read_text()) for p in (1, 2))
    for column in ("zero_shot", "fine_tuned"):  # evaluation sharded over two processes, gathered
        assert one[column]["tasks"] == two[column]["tasks"] and one[column]["rows"] == two[column]["rows"]
