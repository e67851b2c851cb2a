"""Loss balancing, gradient surgery, interference and affinity inside `multitune train` (tiny models)."""

import json

import pytest
import torch

from multitune.config import validate_config
from multitune.errors import MultituneError
from multitune.training.checkpoint import list_checkpoints
from multitune.training.loop import train


def _records(run_dir, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _train_losses(run_dir) -> list[tuple[int, str, float]]:
    return [(r["step"], r.get("task", "*"), r["loss"]) for r in _records(run_dir, "train") if "loss" in r]


@pytest.mark.parametrize(
    "balance",
    [
        "equal",
        {"method": "static", "weights": {"sst2": 2.0, "rte": 0.5}},
        "uncertainty",
        "dwa",
        "famo",
        "pcgrad",
        "cagrad",
        "aligned_mtl",
        "mgda",
        "imtl_g",
    ],
)
def test_every_balance_method_trains(balance, run_config, tmp_path):
    raw = run_config(train={"max_steps": 12, "lr": 3e-3, "log_every": 6, "balance": balance})
    results = train(validate_config(raw))
    name = balance if isinstance(balance, str) else balance["method"]
    assert results["train"]["balance"] == name
    losses = [loss for _, task, loss in _train_losses(tmp_path / "run") if task == "*"]
    assert losses[-1] < losses[0]
    weights = [r for r in _records(tmp_path / "run", "train") if "weight" in r]
    if name in ("equal", "static", "uncertainty", "dwa", "famo"):
        assert {r["task"] for r in weights} == {"sst2", "rte"}
        if name == "static":
            assert {r["task"]: r["weight"] for r in weights} == {"sst2": 2.0, "rte": 0.5}
    else:
        assert weights == []


def test_surgery_without_conflict_is_plain_training(run_config, tmp_path):
    """One task: nothing to conflict with, so PCGrad, CAGrad (c=0) and equal weighting all take the
    plain gradient: the same losses step by step."""
    from conftest import task_sst2

    runs = {}
    for balance in ("rows", "equal", "pcgrad", {"method": "cagrad", "cagrad_c": 0.0}):
        key = balance if isinstance(balance, str) else "cagrad0"
        raw = run_config(
            tasks=[task_sst2()],
            method={"name": "lora", "rank": 4, "dropout": 0.0},
            train={"max_steps": 5, "lr": 1e-2, "balance": balance},
            output=str(tmp_path / key),
        )
        train(validate_config(raw))
        runs[key] = [loss for _, _, loss in _train_losses(tmp_path / key)]
    for key in ("equal", "pcgrad", "cagrad0"):
        assert runs[key] == pytest.approx(runs["rows"], abs=1e-5), key


@pytest.mark.parametrize(
    "method",
    [
        {"name": "lora", "rank": 4, "dropout": 0.0},
        {"name": "cgc_lora", "rank": 4, "alpha": 8, "dropout": 0.0, "common_experts": 1, "task_experts": 1},
    ],
)
def test_surgery_one_forward_per_task_trains_as_the_shared_forward(method, run_config, tmp_path, monkeypatch):
    """On one process surgery runs one forward per task on its rows (about a plain step's cost);
    the per-task gradients must be those of the shared forward's K backward passes: the same
    losses step by step and the same trained weights, for plain and task-gated layers."""
    from multitune.training import loop

    build = loop.Recipe._build_optimizer
    used = {}

    def build_and_choose(self):
        build(self)
        used[self.cfg.output] = self.by_task
        if str(self.cfg.output).endswith("shared"):
            self.by_task = False

    monkeypatch.setattr(loop.Recipe, "_build_optimizer", build_and_choose)
    runs = {}
    for key in ("by_task", "shared"):
        raw = run_config(
            method=method,
            train={"max_steps": 4, "batch_size": 8, "lr": 1e-2, "balance": "pcgrad", "interference_every": 2},
            output=str(tmp_path / key),
        )
        train(validate_config(raw))
        runs[key] = _train_losses(tmp_path / key)
    assert list(used.values()) == [True, True]
    assert [(s, t) for s, t, _ in runs["by_task"]] == [(s, t) for s, t, _ in runs["shared"]]
    assert len({t for _, t, _ in runs["by_task"]}) == 3  # both tasks and the whole batch, every step
    for (_, _, a), (_, _, b) in zip(runs["by_task"], runs["shared"], strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert runs["by_task"][-1][2] < runs["by_task"][0][2]
    cosines = [[r["cosine"] for r in _records(tmp_path / key, "interference") if "cosine" in r] for key in runs]
    assert cosines[0] and cosines[0] == pytest.approx(cosines[1], abs=1e-4)
    from safetensors.torch import load_file

    weights = [load_file(next((tmp_path / key).rglob("*.safetensors"))) for key in runs]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=1e-5), name


def test_interference_is_logged_and_plotted(run_config, tmp_path):
    raw = run_config(train={"max_steps": 6, "batch_size": 8, "interference_every": 2})
    results = train(validate_config(raw))
    records = _records(tmp_path / "run", "interference")
    steps = sorted({r["step"] for r in records})
    assert steps == [1, 3, 5]
    pairs = [r for r in records if r.get("task") == "sst2~rte"]
    assert pairs and all(-1 <= r["cosine"] <= 1 and 0 <= r["magnitude_similarity"] <= 1 for r in pairs)
    rates = [r["conflict_rate"] for r in records if "conflict_rate" in r]
    assert all(rate in (0.0, 1.0) for rate in rates)  # one pair: it conflicts or not
    assert rates == [float(r["cosine"] < 0) for r in pairs]
    matrix = results["interference"]["matrix"]
    assert results["interference"]["measurements"] == 3
    assert matrix[0][0] == pytest.approx(1.0) and matrix[0][1] == pytest.approx(matrix[1][0])
    assert matrix[0][1] == pytest.approx(sum(r["cosine"] for r in pairs) / len(pairs))
    png = (tmp_path / "run" / "interference.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_affinity_is_measured_logged_and_averaged(run_config, tmp_path):
    raw = run_config(
        method={"name": "lora", "rank": 4, "dropout": 0.0},
        train={"max_steps": 4, "batch_size": 8, "lr": 1e-2, "affinity_every": 2, "affinity_lr": 0.05},
    )
    results = train(validate_config(raw))
    z = results["affinity"]["matrix"]
    assert results["affinity"]["measurements"] == 2
    logged = _records(tmp_path / "run", "affinity")
    assert sorted({r["step"] for r in logged}) == [1, 3]
    for i, a in enumerate(("sst2", "rte")):
        for j, b in enumerate(("sst2", "rte")):
            values = [r["affinity"] for r in logged if r.get("task") == f"{a}>{b}"]
            assert z[i][j] == pytest.approx(sum(values) / len(values))
    assert z[0][0] > 0 and z[1][1] > 0  # a step on a task's own loss lowers it
    assert (tmp_path / "run" / "affinity.png").is_file()


@pytest.mark.parametrize("balance", ["famo", "pcgrad"])
def test_resume_with_balance_and_interference_is_exact(balance, run_config, tmp_path):
    common = {"max_steps": 6, "save_every": 2, "log_every": 1, "balance": balance, "interference_every": 2}
    full = validate_config(run_config(train=common, output=str(tmp_path / "full")))
    a = train(full)
    part = validate_config(run_config(train=common, output=str(tmp_path / "part")))
    train(part, stop_after=3)
    assert list_checkpoints(tmp_path / "part/checkpoints")[-1].name == "step-00000003"
    b = train(part, resume=True)
    for (s1, t1, x), (s2, t2, y) in zip(
        _train_losses(tmp_path / "full"), _train_losses(tmp_path / "part"), strict=True
    ):
        assert (s1, t1) == (s2, t2) and x == pytest.approx(y, abs=1e-6)
    weights = [(r["step"], r["task"], r["weight"]) for r in _records(tmp_path / "part", "train") if "weight" in r]
    ref = [(r["step"], r["task"], r["weight"]) for r in _records(tmp_path / "full", "train") if "weight" in r]
    assert [w[:2] for w in weights] == [w[:2] for w in ref]
    for (_, _, x), (_, _, y) in zip(weights, ref, strict=True):
        assert x == pytest.approx(y, abs=1e-6)
    assert a["interference"]["measurements"] == b["interference"]["measurements"] == 3


def test_balance_config_errors(run_config):
    with pytest.raises(MultituneError, match="train.balance.weights must name every task"):
        validate_config(run_config(train={"balance": {"method": "static", "weights": {"sst2": 1.0}}}))
    with pytest.raises(MultituneError, match="'weights' goes with method 'static'"):
        validate_config(run_config(train={"balance": {"method": "famo", "weights": {"sst2": 1.0, "rte": 1.0}}}))
    with pytest.raises(MultituneError, match="train.balance.method"):
        validate_config(run_config(train={"balance": "pcgard"}))
