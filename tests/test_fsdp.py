"""FSDP2 through Accelerate: `accelerate launch --config_file examples/accelerate/fsdp2.yaml` with
two CPU processes (gloo; tests/fsdp_on_cpu.py lets Accelerate take its FSDP path on CPU) against
the same run in one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import task_rte, task_sst2, write_yaml
from safetensors.torch import load_file
from test_distributed import _lines, _multitune, _port, _same_losses

from multitune.config import RunConfig
from multitune.errors import MultituneError
from multitune.training.checkpoint import load_checkpoint, save_checkpoint
from multitune.training.sharding import check_shardable

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "tests" / "fsdp_on_cpu.py"
LORA = {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0}
FAMO = {"balance": {"method": "famo"}, "eval_every": None}


def _fsdp(argv: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    config = REPO / "examples/accelerate/fsdp2.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_port()), str(LAUNCH), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=cwd)


def _config(root: Path, model_dir, method: dict, name: str, batch: int, **train) -> Path:
    raw = {
        "model": str(model_dir),
        "method": method,
        "tasks": [task_sst2(), task_rte()],
        "mixing": {"strategy": "temperature", "temperature": 2.0},
        "train": {"max_steps": 4, "batch_size": batch, "lr": 1e-2, "max_length": 96, "log_every": 1, "seed": 0}
        | {"eval_every": 2, **train},
        "eval": {"max_new_tokens": 6, "batch_size": 8, "zero_shot": True},
        "output": str(root / name),
    }
    return write_yaml(root / f"{name}.yaml", raw)


def _pair(root: Path, model_dir, method: dict, weights_file: str) -> dict:
    one = _multitune(["train", str(_config(root, model_dir, method, "one", 8))], 1, root)
    assert one.returncode == 0, one.stderr[-4000:]
    two = _fsdp(["train", str(_config(root, model_dir, method, "fsdp", 4))], root)
    assert two.returncode == 0, two.stderr[-4000:]
    return {"one": root / "one", "fsdp": root / "fsdp", "stdout": two.stdout, "file": weights_file}


def _same_weights(a_dir: Path, b_dir: Path, name: str) -> None:
    a, b = load_file(str(a_dir / "model" / name)), load_file(str(b_dir / "model" / name))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(a[k].shape == b[k].shape for k in a)  # whole weights, not one process's shard
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory, tiny_model_dir):
    return _pair(tmp_path_factory.mktemp("fsdp_lora"), tiny_model_dir, LORA, "adapter_model.safetensors")


@pytest.mark.slow
def test_fsdp2_lora_is_the_one_process_run(lora_pair):
    run = lora_pair["fsdp"]
    results = json.loads((run / "results.json").read_text())
    assert results["train"]["processes"] == 2 and results["train"]["distributed"] == "fsdp2"
    assert lora_pair["stdout"].count("| **mean** |") == 1  # the main process prints
    one, two = _lines(lora_pair["one"]), _lines(run)
    assert not any("rank_spread" in r for r in two)  # shards differ by design
    _same_losses(one, two)
    _same_weights(lora_pair["one"], run, "adapter_model.safetensors")
    base = json.loads((lora_pair["one"] / "results.json").read_text())
    for column in ("zero_shot", "fine_tuned"):  # each process evaluates its rows with the weights gathered
        assert base[column]["tasks"] == results[column]["tasks"]


@pytest.mark.slow
def test_fsdp2_full_fine_tuning_is_the_one_process_run(tmp_path, tiny_model_dir):
    runs = _pair(tmp_path, tiny_model_dir, {"name": "full"}, "model.safetensors")
    one, two = _lines(runs["one"]), _lines(runs["fsdp"])
    _same_losses(one, two)
    _same_weights(runs["one"], runs["fsdp"], "model.safetensors")  # the whole model, saved from the gathered state
    a, b = (json.loads((runs[k] / "results.json").read_text())["fine_tuned"]["tasks"] for k in ("one", "fsdp"))
    assert a == b


@pytest.mark.slow
def test_fsdp2_stopped_and_resumed_reaches_the_same_weights(lora_pair, tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, LORA, "resumed", 4)
    first = _fsdp(["stop-after", "2", str(config)], tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-00000002"]
    saved = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    assert sum(t.numel() for t in saved.values()) == 8192  # every trainable weight whole, not a shard
    done = _fsdp(["train", str(config), "--resume"], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "[resume] from step-00000002" in done.stdout
    _same_weights(lora_pair["fsdp"], tmp_path / "resumed", "adapter_model.safetensors")
    _same_losses(_lines(lora_pair["fsdp"]), _lines(tmp_path / "resumed"))


@pytest.mark.slow
def test_fsdp2_refuses_per_task_gradients_in_one_line(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, LORA, "pcgrad", 4, balance={"method": "pcgrad"})
    done = _fsdp(["train", str(config)], tmp_path)
    assert done.returncode != 0
    assert "train.balance=pcgrad combines per-task gradients, which FSDP shards" in done.stderr
    # each process stops with the line (the launcher then reports the failed processes its own way)
    assert "[rank0]: Traceback" not in done.stderr and not (tmp_path / "pcgrad").exists()


@pytest.mark.parametrize(
    "method,train,message",
    [
        (LORA, {"balance": {"method": "imtl_g"}}, "train.balance=imtl_g combines per-task gradients"),
        (LORA, {"balance": {"method": "uncertainty"}}, "train.balance=uncertainty learns task weights beside"),
        (LORA, {"interference_every": 2}, "train.interference_every measures per-task gradients"),
        (LORA, {"affinity_every": 2}, "train.affinity_every takes lookahead steps"),
        ({"name": "full"}, {"l2sp": 0.01}, "train.l2sp compares the weights with a full copy"),
        ({"name": "cgc_lora", "rank": 4}, {}, "method cgc_lora reads each row's task in its layers"),
    ],
)
def test_what_fsdp2_cannot_run_is_named(run_config, method, train, message):
    from multitune.methods import task_gated

    raw = run_config(method=method)
    raw["train"] = {**raw["train"], **train}
    cfg = RunConfig.model_validate(raw)
    expected = f"^{message}.*which FSDP shards; run it with DDP \\(examples/accelerate/ddp.yaml\\)$"
    with pytest.raises(MultituneError, match=expected):
        check_shardable(cfg, task_gated(cfg.method))


def test_a_checkpoint_resumes_only_as_it_was_sharded(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    plain = save_checkpoint(tmp_path / "a", 1, model, optimizer, scheduler, {}, keep=1)
    with pytest.raises(MultituneError, match="was saved without FSDP: resume it without FSDP"):
        load_checkpoint(plain, model, optimizer, scheduler, sharded=True)
    by_name = {"state": {}, "param_groups": [{**optimizer.param_groups[0], "params": ["weight", "bias"]}]}
    fsdp = save_checkpoint(tmp_path / "b", 1, model, optimizer, scheduler, {}, keep=1, optimizer_state=by_name)
    with pytest.raises(MultituneError, match="was saved with FSDP: resume it with FSDP"):
        load_checkpoint(fsdp, model, optimizer, scheduler)
    assert load_checkpoint(plain, model, optimizer, scheduler)["step"] == 1


def test_the_example_accelerate_configs_load_as_accelerate_reads_them():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    found = {f: load_config_from_file(str(REPO / "examples/accelerate" / f"{f}.yaml")) for f in ("ddp", "fsdp2")}
    found["ds"] = load_config_from_file(str(REPO / "examples/accelerate/deepspeed_zero2.yaml"))
    assert found["ddp"].distributed_type == DistributedType.MULTI_GPU
    assert found["fsdp2"].distributed_type == DistributedType.FSDP and found["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert found["ds"].distributed_type == DistributedType.DEEPSPEED and found["ds"].deepspeed_config["zero_stage"] == 2


@pytest.mark.slow
def test_fsdp2_runs_a_loss_balancer_as_one_process(tmp_path, tiny_model_dir):
    """`famo` weighs the tasks from their losses over the global batch: the same as one process."""
    one = _multitune(["train", str(_config(tmp_path, tiny_model_dir, LORA, "one", 8, **FAMO))], 1, tmp_path)
    assert one.returncode == 0, one.stderr[-4000:]
    two = _fsdp(["train", str(_config(tmp_path, tiny_model_dir, LORA, "fsdp", 4, **FAMO))], tmp_path)
    assert two.returncode == 0, two.stderr[-4000:]
    _same_losses(_lines(tmp_path / "one"), _lines(tmp_path / "fsdp"))
    _same_weights(tmp_path / "one", tmp_path / "fsdp", "adapter_model.safetensors")
