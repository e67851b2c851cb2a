"""Experiment tracking through Accelerate's trackers: TensorBoard and MLflow (a real install, its
local SQLite store, offline) receive the same per-task series as metrics.jsonl, a resumed run
continues its MLflow run, and a tracker that is not installed is one line."""

import json
import os
from pathlib import Path

import pytest
from conftest import write_yaml

from multitune.cli import main
from multitune.config import validate_config
from multitune.training.loop import train
from multitune.training.tracking import flat_config


def _jsonl_series(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as tracker series: split/key and split/task/key -> {step: value}."""
    out: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        prefix = f"{r['split']}/{r['task']}" if "task" in r else r["split"]
        for key, value in r.items():
            if key not in ("step", "split", "task") and isinstance(value, int | float) and not isinstance(value, bool):
                out.setdefault(f"{prefix}/{key}", {})[r["step"]] = float(value)
    return out


def _mlflow_series(run: Path) -> tuple[dict[str, dict[int, float]], list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(run / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("multitune")
    runs = client.search_runs([experiment.experiment_id])
    series = {}
    for key in runs[0].data.metrics:
        series[key] = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}
    return series, runs


def _tensorboard_series(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_flat_config_keys_tasks_by_name():
    raw = {
        "train": {"lr": 1e-3, "early_stopping": None, "report_to": ["tensorboard", "mlflow"]},
        "tasks": [{"name": "sst2", "labels": ["negative", "positive"], "data": {"train": "a.jsonl"}}],
    }
    assert flat_config(raw) == {
        "train.lr": 1e-3,
        "train.early_stopping": None,
        "train.report_to": '["tensorboard", "mlflow"]',
        "tasks.sst2.labels": '["negative", "positive"]',
        "tasks.sst2.data.train": "a.jsonl",
    }


@pytest.mark.skipif(os.environ.get("MLFLOW_TRACKING_URI") is not None, reason="the run would log to that server")
def test_tensorboard_and_mlflow_get_every_series_and_a_resume_continues_the_run(run_config, tmp_path):
    common = {"max_steps": 6, "log_every": 2, "eval_every": 3, "save_every": 2, "report_to": ["tensorboard", "mlflow"]}
    cfg = validate_config(run_config(train=common, output=str(tmp_path / "run")))
    train(cfg, stop_after=4)
    run = tmp_path / "run"
    first = json.loads((run / "trackers.json").read_text())["mlflow"]
    train(cfg, resume=True)
    assert os.environ.get("MLFLOW_TRACKING_URI") is None, "the run's store is not left to the next run"

    expected = _jsonl_series(run)
    assert {"train/loss", "train/sst2/loss", "train/rte/loss", "dev/sst2/accuracy", "dev/rte/macro_f1"} <= set(expected)
    assert sorted(expected["train/sst2/loss"]) == [2, 4, 6] and sorted(expected["dev/mean"]) == [3, 6]

    mlflow, runs = _mlflow_series(run)
    assert len(runs) == 1 and runs[0].info.run_id == first, "the resumed run logs into the same MLflow run"
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["train.max_steps"] == "6" and runs[0].data.params["method.name"] == "lora"
    tensorboard = _tensorboard_series(run)
    for name, series in expected.items():
        assert mlflow[name] == pytest.approx(series, rel=1e-6), name
        assert tensorboard[name] == pytest.approx(series, rel=1e-6), name
    results = json.loads((run / "results.json").read_text())["fine_tuned"]
    for task, metrics in results["tasks"].items():
        assert mlflow[f"final/{task}/accuracy"] == {6: pytest.approx(metrics["accuracy"])}
    assert mlflow["final/mean"] == {6: pytest.approx(results["mean"])}


def test_no_tracker_writes_no_tracker_files(run_config, tmp_path):
    cfg = validate_config(run_config(train={"max_steps": 2, "report_to": []}, output=str(tmp_path / "run")))
    train(cfg)
    assert not (tmp_path / "run" / "tb").exists() and not (tmp_path / "run" / "mlflow.db").exists()


def test_a_tracker_that_is_not_installed_is_one_line(run_config, tmp_path, capsys):
    path = write_yaml(tmp_path / "c.yaml", run_config(train={"max_steps": 2}, output=str(tmp_path / "run")))
    assert main(["train", str(path), "train.report_to=[tensorboard, swanlab]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "multitune: error: train.report_to: swanlab is not installed; pip install swanlab"
    assert not (tmp_path / "run").exists()
    assert main(["train", str(path), "train.report_to=[tensorbored]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.report_to" in err and "tensorbored" in err and "\n" not in err
