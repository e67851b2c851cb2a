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


LORA = {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0}


def _train_pair(root, model_dir, method: dict, train: dict, eval_: dict, dev_rows: int | None = None) -> dict:
    """The same run in one process with batch 8 and in two processes with batch 4 each:
    {processes: (run dir, completed process)}; `dev_rows`: rte's dev rows (sst2 keeps its 16)."""
    from conftest import task_rte, task_sst2

    rte = task_rte() if dev_rows is None else {**task_rte(), "max_eval_examples": dev_rows}
    runs = {}
    for processes, batch in ((1, 8), (2, 4)):
        raw = {
            "model": str(model_dir),
            "method": method,
            "tasks": [task_sst2(), rte],
            "mixing": {"strategy": "temperature", "temperature": 2.0},
            "train": {"max_steps": 4, "batch_size": batch, "lr": 1e-2, "max_length": 96, "log_every": 1, **train},
            "eval": {"max_new_tokens": 6, "batch_size": 8, **eval_},
            "output": str(root / f"p{processes}"),
        }
        done = _multitune(["train", str(write_yaml(root / f"p{processes}.yaml", raw))], processes, root)
        assert done.returncode == 0, done.stderr[-4000:]
        runs[processes] = (root / f"p{processes}", done)
    return runs


def _same_losses(one: list[dict], two: list[dict], splits=("train", "dev")) -> None:
    key = lambda r: (r["step"], r["split"], r.get("task"))  # noqa: E731
    two_by = {key(r): r for r in two}
    for rec in one:
        if rec["split"] not in splits:
            continue
        other = two_by[key(rec)]
        for name in ("rows", "tokens", "accuracy", "mean"):
            assert rec.get(name) == other.get(name), (rec, other)
        for name in ("loss", "weight", "cosine", "magnitude_similarity", "conflict_rate"):
            if name in rec:
                assert other[name] == pytest.approx(rec[name], rel=1e-4, abs=1e-6), (name, rec, other)


def _same_weights(one, two) -> None:
    a = load_file(str(one / "model" / "adapter_model.safetensors"))
    b = load_file(str(two / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    """lora, 4 steps, dev eval at steps 2 and 4, zero-shot first."""
    root = tmp_path_factory.mktemp("ddp")
    return _train_pair(root, tiny_model_dir, LORA, {"eval_every": 2, "seed": 0}, {"zero_shot": True})


def test_two_processes_are_two_and_speak_once(pair):
    run, done = pair[2]
    results = json.loads((run / "results.json").read_text())
    assert results["train"]["processes"] == 2  # not one process started twice
    assert done.stdout.count("[train] 4 steps x 8 rows") == 1 and done.stdout.count("| **mean** |") == 1


def test_the_processes_stay_in_step_and_log_every_row(pair):
    one, two = _lines(pair[1][0]), _lines(pair[2][0])
    train_two = [r for r in two if r["split"] == "train" and "rank_spread" in r]
    assert [r["step"] for r in train_two] == [1, 2, 3, 4] and all(r["rank_spread"] == 0.0 for r in train_two)
    _same_losses(one, two)


def test_same_weights_and_same_results_as_one_process(pair):
    _same_weights(pair[1][0], pair[2][0])
    one, two = (json.loads((pair[p][0] / "results.json").read_text()) for p in (1, 2))
    for column in ("zero_shot", "fine_tuned"):  # evaluation sharded over two processes, gathered
        assert one[column]["tasks"] == two[column]["tasks"] and one[column]["rows"] == two[column]["rows"]


@pytest.mark.parametrize(
    "method,train",
    [
        ({"name": "cgc_lora", "rank": 4, "alpha": 8, "dropout": 0.0, "common_experts": 1, "task_experts": 1}, {}),
        ({"name": "adapter", "per_task": "task", "bottleneck": 8}, {}),  # parameters a step does not reach
        (LORA, {"balance": {"method": "pcgrad"}, "interference_every": 2}),  # per-task gradients, all-reduced
        (LORA, {"balance": {"method": "famo"}}),  # a balancer reading each task's loss over the global batch
    ],
    ids=["cgc_lora", "adapter-per-task", "pcgrad+interference", "famo"],
)
def test_methods_and_balancers_take_the_one_process_step(tmp_path, tiny_model_dir, method, train):
    # rte scored on one dev row: the second process's shard of it is empty
    runs = _train_pair(tmp_path, tiny_model_dir, method, {**train, "seed": 0}, {"zero_shot": False}, dev_rows=1)
    one, two = _lines(runs[1][0]), _lines(runs[2][0])
    results = [json.loads((runs[p][0] / "results.json").read_text())["fine_tuned"] for p in (1, 2)]
    assert results[0]["tasks"] == results[1]["tasks"] and results[1]["tasks"]["rte"]["n"] == 1
    _same_losses(one, two, splits=("train", "interference"))
    if "interference_every" in train:
        pairs = [r for r in two if r["split"] == "interference" and "cosine" in r]
        assert pairs and all(-1 <= r["cosine"] <= 1 for r in pairs)  # compared with one process above
        measured = [[r["step"] for r in run if r["split"] == "interference" and "task" not in r] for run in (one, two)]
        assert measured[0] == measured[1] and len(measured[0]) == 2
    _same_weights(runs[1][0], runs[2][0])


def test_stopped_and_resumed_on_two_processes_reaches_the_same_weights(pair, tmp_path, tiny_model_dir):
    """Stopped after step 2 (checkpoint), then `--resume` on two processes: the weights and the
    loss curve of the run that went straight through."""
    import yaml

    raw = yaml.safe_load((pair[2][0] / "config.yaml").read_text())
    raw["output"] = str(tmp_path / "resumed")
    config = write_yaml(tmp_path / "resumed.yaml", raw)
    script = tmp_path / "stop_after_2.py"
    script.write_text(
        "import sys\nfrom multitune.config import load_config\nfrom multitune.training.loop import train\n"
        "train(load_config(sys.argv[1]), stop_after=2)\n"
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    first = subprocess.run(
        [*launcher, "--master_port", str(_port()), str(script), str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr[-4000:]
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-00000002"]
    done = _multitune(["train", str(config), "--resume"], 2, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "[resume] from step-00000002" in done.stdout
    _same_weights(pair[2][0], tmp_path / "resumed")
    _same_losses(_lines(pair[2][0]), _lines(tmp_path / "resumed"))


def test_what_one_process_computes_is_refused_on_two_in_one_line(tmp_path, tiny_model_dir):
    from conftest import task_rte, task_sst2

    tasks = [{**task_sst2(), "domain": "reviews"}, {**task_rte(), "domain": "nli"}]
    raw = {
        "model": str(tiny_model_dir),
        "method": LORA,
        "tasks": tasks,
        "train": {"max_steps": 2, "batch_size": 4, "max_length": 96, "domain": {"method": "dann"}},
        "output": str(tmp_path / "dann"),
    }
    done = _multitune(["train", str(write_yaml(tmp_path / "dann.yaml", raw))], 2, tmp_path)
    assert done.returncode != 0
    assert "train.domain computes its loss over one process's rows; run it without accelerate launch" in done.stderr
    assert "[rank0]: Traceback" not in done.stderr and not (tmp_path / "dann").exists()


def test_a_signal_to_one_process_stops_both_at_one_checkpoint_and_resume_goes_on(tmp_path, tiny_model_dir):
    """SIGTERM to one of two training processes (not the main one, which writes checkpoints):
    both stop after the same step with one checkpoint, and `--resume` on two processes then ends
    with the weights and loss curve of a run that was never stopped."""
    import signal
    import time

    import psutil
    from conftest import task_rte, task_sst2

    def config(name: str):
        raw = {
            "model": str(tiny_model_dir),
            "method": LORA,
            "tasks": [task_sst2(), task_rte()],
            "train": {"max_steps": 40, "batch_size": 4, "lr": 1e-2, "max_length": 96, "log_every": 1, "seed": 0},
            "eval": {"max_new_tokens": 6, "batch_size": 8, "zero_shot": False},
            "output": str(tmp_path / name),
        }
        return write_yaml(tmp_path / f"{name}.yaml", raw)

    straight = _multitune(["train", str(config("straight"))], 2, tmp_path)
    assert straight.returncode == 0, straight.stderr[-4000:]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd = [*launcher, "--master_port", str(_port()), "-m", "multitune", "train", str(config("stopped"))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    log = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and '"step": 3,' in log.read_text()):
        time.sleep(0.05)
    workers = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children()}
    workers["1"].send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    saved = [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()]
    assert len(saved) == 1, (saved, err[-3000:])
    step = int(saved[0].removeprefix("step-"))
    assert 3 <= step < 40 and f"at step {step}: checkpoint saved" in out, out[-2000:]
    assert not (tmp_path / "stopped" / "results.json").exists()
    done = _multitune(["train", str(config("stopped")), "--resume"], 2, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"[resume] from step-{step:08d}" in done.stdout
    _same_weights(tmp_path / "straight", tmp_path / "stopped")
    _same_losses(_lines(tmp_path / "straight"), _lines(tmp_path / "stopped"), splits=("train",))
