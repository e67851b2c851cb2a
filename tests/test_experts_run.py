"""Task-gated experts through the whole tool: train, eval, export, gates, fallback for new tasks."""

import json

import pytest
import torch
from conftest import DATA, write_yaml

from multitune import rundir
from multitune.cli import main
from multitune.config import validate_config
from multitune.methods import count_parameters
from multitune.methods.experts import task_id
from multitune.methods.task_context import task_context
from multitune.models.base import load_base_model
from multitune.models.load import load_trained_model
from multitune.training.loop import train

CGC = {"name": "cgc_lora", "rank": 8, "alpha": 16, "dropout": 0.0, "common_experts": 2, "task_experts": 1}


@pytest.fixture
def cgc_run(run_config, tmp_path):
    raw = run_config(method=CGC, train={"max_steps": 6, "lr": 2e-2})
    raw["tasks"][0]["cluster"] = "sentiment"
    raw["tasks"][1]["cluster"] = "nli"
    path = write_yaml(tmp_path / "run.yaml", raw)
    assert main(["train", str(path)]) == 0
    return tmp_path / "run"


def _logits(model, ids, tid=None):
    with torch.no_grad():
        if tid is None:
            return model(input_ids=ids).logits
        with task_context(torch.tensor([tid])):
            return model(input_ids=ids).logits


def test_cgc_run_exports_plain_lora_and_merged_weights(cgc_run, capsys):
    cfg = rundir.load_run_config(cgc_run)
    results = json.loads((cgc_run / "results.json").read_text())
    assert set(results["fine_tuned"]["tasks"]) == {"sst2", "rte"}
    model, tok = load_trained_model(cgc_run, cfg)
    ids = tok("Review: an honest, moving film", return_tensors="pt").input_ids
    sst2 = task_id(model, "sst2")
    gated = _logits(model, ids, sst2)
    base = load_base_model(cfg.model)
    assert not torch.allclose(gated, _logits(base, ids), atol=1e-4), "training moved the sst2 update"

    assert main(["export", str(cgc_run), "--task", "sst2", "--format", "peft-lora"]) == 0
    from peft import PeftModel

    out = cgc_run / "export/sst2-peft-lora"
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA"
    # 2 clusters x 2 common + 2 tasks x 1 own = 6 experts share rank 8: 1 slot each, the 2 left over go to the
    # first common expert of each cluster; sst2 sees its cluster's common experts (2 + 1) and its own (1)
    assert conf["r"] == 4
    plain = PeftModel.from_pretrained(load_base_model(cfg.model), str(out)).eval()
    assert (plain(input_ids=ids).logits - gated).abs().max().item() <= 1e-4

    assert main(["export", str(cgc_run), "--task", "sst2", "--format", "merged"]) == 0
    merged = load_base_model(str(cgc_run / "export/sst2-merged")).eval()
    assert (_logits(merged, ids) - gated).abs().max().item() <= 1e-4

    assert main(["export", str(cgc_run), "--format", "merged"]) == 2
    assert "keeps one update per task: pass --task" in capsys.readouterr().err
    assert main(["export", str(cgc_run), "--task", "mnli"]) == 2
    assert "unknown task 'mnli'" in capsys.readouterr().err


def test_gates_command_prints_the_table_and_writes_a_heatmap(cgc_run, capsys):
    capsys.readouterr()
    assert main(["gates", str(cgc_run)]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "task" not in line
    }
    assert {"sst2", "rte"} <= set(rows)
    weights = [float(x) for x in rows["sst2"].split("|")[2:-1]]
    assert sum(weights) == pytest.approx(1.0, abs=1e-3)
    assert sum(w == 0.0 for w in weights) == 3  # nli's 2 common experts and rte's own expert are outside sst2's gate
    assert (cgc_run / "gates.png").stat().st_size > 1000


def test_new_task_needs_a_fallback(cgc_run, tmp_path, run_config, capsys):
    other = run_config()
    other["tasks"] = [
        {
            "name": "news",
            "kind": "classification",
            "data": {"dev": str(DATA / "ag_news/dev.jsonl")},
            "prompt": "{{ text }}\nTopic?",
            "target": "{{ label }}",
            "labels": ["Business", "Sci/Tech", "Sports", "World"],
            "max_eval_examples": 6,
        }
    ]
    path = write_yaml(tmp_path / "other.yaml", other)
    capsys.readouterr()
    assert main(["eval", str(cgc_run), "--tasks", str(path)]) == 2
    assert "unknown task 'news'; the model knows: sst2, rte" in capsys.readouterr().err
    assert main(["eval", str(cgc_run), "--tasks", str(path), "--task-fallback", "common"]) == 0
    assert "| news | accuracy |" in capsys.readouterr().out


def test_moe_lora_trains_and_counts_like_lora(run_config):
    moe = validate_config(run_config(method={"name": "moe_lora", "rank": 8, "experts": 4}, train={"max_steps": 2}))
    lora = validate_config(run_config(method={"name": "lora", "rank": 8}))
    from multitune.methods import apply_method

    moe_model = apply_method(load_base_model(moe.model), moe.method, moe.tasks)
    n_moe, _ = count_parameters(moe_model)
    n_lora, _ = count_parameters(apply_method(load_base_model(lora.model), lora.method, lora.tasks))
    # same A/B budget as LoRA; the shared gate adds a task embedding (2 tasks x d) and its projection (4 experts x d)
    d = moe_model.peft_config["default"].task_embedding_dim
    assert n_moe == n_lora + (2 + 4) * d
    results = train(moe)
    assert results["train"]["steps"] == 2 and results["train"]["trainable_parameters"] == n_moe


@pytest.mark.parametrize(
    "method",
    [
        {"name": "mtl_lora", "rank": 4, "alpha": 8, "dropout": 0.0, "up_projections": 2},
        {"name": "lora_experts", "share": "B", "rank": 8, "alpha": 8, "dropout": 0.0, "experts": 2},
    ],
    ids=["mtl_lora", "lora_experts-B"],
)
def test_shared_factor_run_trains_exports_and_shows_its_weights(run_config, tmp_path, capsys, method):
    path = write_yaml(tmp_path / "run.yaml", run_config(method=method, train={"max_steps": 4, "lr": 2e-2}))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    cfg = rundir.load_run_config(run)
    model, tok = load_trained_model(run, cfg)
    ids = tok("Premise: it rains. Hypothesis: it is wet.", return_tensors="pt").input_ids
    rte = _logits(model, ids, 1)
    assert not torch.allclose(rte, _logits(load_base_model(cfg.model), ids), atol=1e-4), "training moved rte's update"

    assert main(["export", str(run), "--task", "rte", "--format", "peft-lora"]) == 0
    from peft import PeftModel

    out = run / "export/rte-peft-lora"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    plain = PeftModel.from_pretrained(load_base_model(cfg.model), str(out)).eval()
    assert (plain(input_ids=ids).logits - rte).abs().max().item() <= 1e-4

    capsys.readouterr()
    assert main(["gates", str(run)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| rte |")]
    assert len(lines) == 1 and sum(float(x) for x in lines[0].split("|")[2:-1]) == pytest.approx(1.0, abs=1e-3)
    assert (run / "gates.png").stat().st_size > 1000
