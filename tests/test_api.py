"""The Python API: a tiny run driven entirely through `import multitune`, without the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import task_rte, task_sst2

import multitune


def test_a_run_through_the_python_api(run_config, tmp_path):
    raw = run_config(train={"max_steps": 2, "threads": 1}, eval={"zero_shot": True})
    before = torch.get_num_threads()
    results = multitune.train(raw, ["train.lr=2e-3"])
    assert torch.get_num_threads() == before  # train.threads held for the call only
    run = tmp_path / "run"
    assert results == json.loads((run / "results.json").read_text())
    assert set(results["fine_tuned"]["tasks"]) == {"sst2", "rte"} and results["train"]["steps"] == 2
    assert "lr: 0.002" in (run / "config.yaml").read_text()

    done = multitune.evaluate(run, ["tasks.sst2.max_eval_examples=4"])
    assert done["model"] == "trained" and done["split"] == "dev"
    assert done["results"]["tasks"]["sst2"]["n"] == 4 and len(done["results"]["rows"]["sst2"]) == 4
    assert done["saved"].parent == run / "evals" and json.loads(done["saved"].read_text())["fine_tuned"]
    base = multitune.evaluate(raw, base=True)
    assert base["saved"] is None and base["model"] == "base" and "| task | metric | n | zero-shot |" in base["table"]
    assert base["results"]["tasks"] == results["zero_shot"]["tasks"]  # the same model, the same rows

    rows = multitune.predict(run, "sst2", [{"text": "a fine film", "id": 7}, {"text": "dull", "id": 8}])
    assert [r["id"] for r in rows] == [7, 8] and all(r["prediction"] in ("negative", "positive") for r in rows)
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a fine film", "id": 7}\n{"text": "dull", "id": 8}\n')
    assert multitune.predict(run, "sst2", path) == rows

    exported = multitune.export(run)
    assert exported == run / "export" / "lora-peft-lora" and (exported / "adapter_config.json").is_file()
    page = multitune.report(run)
    assert page == run / "report.html" and page.read_text().startswith("<!DOCTYPE html>")


def test_compare_and_affinity_return_their_results(run_config, tmp_path):
    raw = run_config(tasks=[task_sst2(), task_rte()], mixing={"strategy": "uniform"}, train={"max_steps": 2})
    summary = multitune.compare(raw)
    assert set(summary["tasks"]) == {"sst2", "rte"} and "Δm" in summary["text"]
    assert summary == {**json.loads((tmp_path / "run" / "compare.json").read_text()), "text": summary["text"]}
    found = multitune.affinity(raw, steps=2, clusters=2, output=str(tmp_path / "aff"))
    assert found["tasks"] == ["sst2", "rte"] and len(found["matrix"]) == 2
    assert (
        set(found["clusters"]) == {"sst2", "rte"}
        and (tmp_path / "aff" / "affinity.md").read_text() == found["text"] + "\n"
    )


def test_api_errors(run_config):
    with pytest.raises(multitune.MultituneError, match="a run config is a YAML path, a dict or a RunConfig, not int"):
        multitune.train(3)
    with pytest.raises(multitune.MultituneError, match="config dict: unknown key 'train.lrr'"):
        multitune.train(run_config(train={"lrr": 1}))
    with pytest.raises(AttributeError, match="no attribute 'fit'"):
        multitune.fit  # noqa: B018
