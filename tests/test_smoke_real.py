"""The real bundled model end to end: load, a few LoRA steps on real data, evaluate, predict."""

import json

import pytest
from conftest import task_sst2

from multitune import rundir
from multitune.cli import main
from multitune.config import validate_config
from multitune.training.loop import train


@pytest.mark.slow
def test_bundled_model_trains_and_evaluates(tmp_path, capsys):
    sst2 = task_sst2(n_train=32, n_eval=12)
    sst2["prompt"] = "Review: {{ text }}\nIs the sentiment of this review positive or negative?"
    raw = {
        "model": "smollm2-135m-instruct",
        "method": {"name": "lora", "rank": 8, "alpha": 16},
        "tasks": [sst2],
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "max_length": 128, "log_every": 1},
        "eval": {"zero_shot": True, "batch_size": 8},
        "output": str(tmp_path / "run"),
    }
    results = train(validate_config(raw))
    assert results["train"]["trainable_parameters"] == 2_442_240  # rank 8 on all 7 linears x 30 layers
    assert results["train"]["total_parameters"] == 134_515_008 + 2_442_240
    zero = results["zero_shot"]["tasks"]["sst2"]["accuracy"]
    tuned = results["fine_tuned"]["tasks"]["sst2"]["accuracy"]
    assert 0 <= zero <= 100 and 0 <= tuned <= 100
    assert zero > 50, "the instruct model already beats chance on sentiment"
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(0 < loss < 20 for loss in losses)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "an utterly delightful, moving film"}\n')
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), "--task", "sst2", "--input", str(inp)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["prediction"] == "positive"
    cfg = rundir.load_run_config(tmp_path / "run")
    assert cfg.model == "smollm2-135m-instruct"
