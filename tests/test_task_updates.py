"""bench/task_updates.py: the geometry of the tasks' weight updates (study diagnostics)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_bench, write_yaml

from multitune import rundir
from multitune.cli import main
from multitune.methods.registry import method
from multitune.models.base import load_base_model
from multitune.models.load import load_trained_model


def _bench():
    return load_bench("task_updates")


def test_geometry_by_hand():
    b = _bench()
    # two layers; task 0's update (3, 0 | 0), task 1's (0, 4 | 0): orthogonal, norms 3 and 4
    layers = [("l1", [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])]), ("l2", [torch.zeros(1), torch.zeros(1)])]
    g = b.geometry(iter(layers), 2)
    assert g["norms"] == pytest.approx([3.0, 4.0])
    assert g["cosines"][0] == pytest.approx([1.0, 0.0]) and g["cosines"][1] == pytest.approx([0.0, 1.0])
    # ||mean||^2 = (1.5^2 + 2^2) = 6.25; mean ||d_t||^2 = (9 + 16) / 2 = 12.5
    assert g["shared"] == pytest.approx(0.5) and g["layers"] == 2
    same = b.geometry(iter([("l", [torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])])]), 2)
    assert same["cosines"][0][1] == pytest.approx(1.0) and same["shared"] == pytest.approx(0.9)  # 2.25*5 / 12.5


def _flat_delta(run_dir: Path, task: str | None) -> torch.Tensor:
    """The update of `task` as merged weights minus the base weights, over the adapted linears."""
    cfg = rundir.load_run_config(run_dir)
    model, _ = load_trained_model(run_dir, cfg)
    entry = method(cfg.method.name)
    merged = entry.merge(model, task) if task else model.merge_and_unload()
    base = load_base_model(cfg.model).state_dict()
    parts = [w - base[n] for n, w in merged.state_dict().items() if n in base and not torch.equal(w, base[n])]
    return torch.cat([p.reshape(-1).double() for p in parts])


def test_gated_and_apart_updates_are_the_merged_weights_minus_the_base(run_config, tmp_path):
    b = _bench()
    cgc = {"name": "cgc_lora", "rank": 8, "alpha": 16, "dropout": 0.0, "common_experts": 1, "task_experts": 1}
    raw = run_config(method=cgc, train={"max_steps": 3, "lr": 2e-2}, output=str(tmp_path / "cgc"))
    assert main(["train", str(write_yaml(tmp_path / "cgc.yaml", raw))]) == 0
    tasks, layers = b.gated_deltas(*b.load_run(tmp_path / "cgc"))
    g = b.geometry(layers, len(tasks))
    d = [_flat_delta(tmp_path / "cgc", t) for t in tasks]
    assert g["norms"] == pytest.approx([float(x.norm()) for x in d], rel=1e-4)
    assert g["cosines"][0][1] == pytest.approx(float(d[0] @ d[1] / d[0].norm() / d[1].norm()), abs=1e-4)

    apart = []
    for spec in raw["tasks"]:
        one = run_config(tasks=[spec], train={"max_steps": 3, "lr": 2e-2}, output=str(tmp_path / spec["name"]))
        assert main(["train", str(write_yaml(tmp_path / f"{spec['name']}.yaml", one))]) == 0
        apart.append(tmp_path / spec["name"])
    tasks, layers = b.apart_deltas(apart)
    g = b.geometry(layers, len(tasks))
    d = [_flat_delta(run, None) for run in apart]
    assert tasks == [spec["name"] for spec in raw["tasks"]]
    assert g["norms"] == pytest.approx([float(x.norm()) for x in d], rel=1e-4)
    assert g["cosines"][0][1] == pytest.approx(float(d[0] @ d[1] / d[0].norm() / d[1].norm()), abs=1e-4)


def test_plain_lora_runs_are_refused_in_one_line(run_config, tmp_path):
    b = _bench()
    raw = run_config(train={"max_steps": 1})
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", raw))]) == 0
    with pytest.raises(b.MultituneError, match="lora gives every task the same update; use --apart"):
        b.gated_deltas(*b.load_run(tmp_path / "run"))
    with pytest.raises(b.MultituneError, match="--apart takes single-task plain LoRA runs"):
        b.apart_deltas([tmp_path / "run"])


def test_gate_spread_of_a_shared_factor_run_from_its_saved_logits(run_config, tmp_path):
    from safetensors.torch import load_file

    b = _bench()
    spec = {"name": "lora_experts", "rank": 4, "experts": 2, "temperature": 0.5, "dropout": 0.0}
    raw = run_config(method=spec, train={"max_steps": 2, "lr": 1e-2})
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", raw))]) == 0
    spread = b.gate_spread(*b.load_run(tmp_path / "run"))
    saved = load_file(tmp_path / "run" / "model" / "adapter_model.safetensors")
    z = torch.stack([v for k, v in saved.items() if "lora_experts_gate" in k]).float() / 0.5  # (L, tasks, 2)
    w = torch.softmax(z, -1)
    assert spread["weights"] == pytest.approx([float(w.min()), float(w.max())], abs=1e-6)
    span = (z[..., 0] - z[..., 1]).abs()  # two experts: max - min = |z0 - z1|
    assert spread["logit_span"] == pytest.approx([float(span.mean()), float(span.max())], abs=1e-5)
    pair = (w[:, 0] * w[:, 1]).sum(-1)  # two tasks: the one pair
    assert spread["coupling"] == pytest.approx([float(pair.min()), float(pair.max())], abs=1e-6)
    # one gate for all layers: nothing to spread
    assert b.gate_spread(*b.load_run(_cgc_run(run_config, tmp_path))) is None


def _cgc_run(run_config, tmp_path) -> Path:
    cgc = {"name": "cgc_lora", "rank": 4, "alpha": 8, "dropout": 0.0, "common_experts": 1, "task_experts": 1}
    raw = run_config(method=cgc, train={"max_steps": 1}, output=str(tmp_path / "cgc1"))
    assert main(["train", str(write_yaml(tmp_path / "cgc1.yaml", raw))]) == 0
    return tmp_path / "cgc1"
