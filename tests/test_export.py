"""`multitune export --format peft-lora`: adapters that multi-LoRA servers (vLLM, SGLang, LoRAX)
accept, checked against their rules and reloaded by vanilla PEFT in a process without multitune;
`--max-rank` re-factorisation by truncated SVD."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import plain_peft_logits, write_yaml
from safetensors.torch import load_file

from multitune import rundir
from multitune.cli import main
from multitune.methods.lora.export import lora_factors, truncate
from multitune.methods.task_context import task_context
from multitune.models.load import load_trained_model


def check_server_rules(adapter, base_dir) -> dict:
    """What vLLM / SGLang / LoRAX require of a LoRA adapter; returns its config."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert not config.get("modules_to_save") and not config.get("use_dora") and not config.get("use_rslora")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    base_names = {name.rsplit(".", 1)[-1] for name, _ in _base_modules(base_dir)}
    assert set(config["target_modules"]) <= base_names
    for key, value in weights.items():
        assert key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight")), key
        assert value.shape[0 if key.endswith("lora_A.weight") else 1] == config["r"], key
    return config


def _base_modules(base_dir):
    from transformers import AutoModelForCausalLM

    return list(AutoModelForCausalLM.from_pretrained(str(base_dir)).named_modules())


def _logits(run_dir, ids, task=None):
    cfg = rundir.load_run_config(run_dir)
    model, _ = load_trained_model(run_dir, cfg)
    tid = torch.tensor([cfg.task_names.index(task)] * len(ids)) if task else torch.zeros(len(ids), dtype=torch.long)
    with torch.no_grad(), task_context(tid):
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    ("method", "task"),
    [
        ({"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.1}, None),
        ({"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0, "rslora": True}, None),
        ({"name": "cgc_lora", "rank": 6, "alpha": 12, "common_experts": 1, "task_experts": 1}, "rte"),
    ],
)
def test_peft_lora_export_is_what_servers_load(run_config, tiny_model_dir, tmp_path, method, task):
    raw = run_config(method=method, train={"max_steps": 3, "lr": 1e-2})
    cfg = write_yaml(tmp_path / "run.yaml", raw)
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    argv = ["export", str(run)] + (["--task", task] if task else [])
    assert main(argv) == 0
    adapter = run / "export" / f"{task or 'lora'}-peft-lora"
    config = check_server_rules(adapter, tiny_model_dir)
    record = json.loads((adapter / "multitune_export.json").read_text())
    assert record["relative_error"] == 0.0 and record["rank"] == config["r"]
    ids = torch.randint(0, 600, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = _logits(run, ids, task)
    plain = plain_peft_logits([{"key": "x", "base": str(tiny_model_dir), "adapter": str(adapter), "ids": ids.tolist()}],
                              tmp_path)["x"]  # fmt: skip
    assert (plain - expected).abs().max() <= 1e-4


def test_truncation_is_the_best_low_rank_approximation():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 20, generator=gen), torch.randn(12, 6, generator=gen)
    delta = 0.5 * b @ a
    a2, b2, err = truncate(a, b, 0.5, 3)
    assert a2.shape == (3, 20) and b2.shape == (12, 3)
    u, s, vh = torch.linalg.svd(delta.double())
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose((b2 @ a2).double(), best, atol=1e-5)
    assert err == pytest.approx(float((s[3:] ** 2).sum()), rel=1e-6)


def test_max_rank_reports_the_error_it_introduced(run_config, tiny_model_dir, tmp_path, capsys):
    raw = run_config(
        method={"name": "lora", "rank": 8, "alpha": 16, "dropout": 0.0}, train={"max_steps": 3, "lr": 1e-2}
    )
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", raw))]) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["export", str(run), "--max-rank", "2", "--out", str(tmp_path / "r2")]) == 0
    out, err = capsys.readouterr()
    steps = [line.split(" | ")[1] for line in err.splitlines() if line.startswith("export: ")]
    assert steps == ["done=model loaded", "done=peft-lora weights written", "done=tokenizer and model card"]
    config = check_server_rules(tmp_path / "r2", tiny_model_dir)
    assert config["r"] == 2 and config["lora_alpha"] == 2.0
    # the error, recomputed from the run's own factors with a full SVD of every layer's update
    cfg = rundir.load_run_config(run)
    model, _ = load_trained_model(run, cfg)
    dropped = total = 0.0
    for a, b, scaling in lora_factors(model).values():
        s = torch.linalg.svdvals((scaling * b @ a).double())
        dropped += float((s[2:] ** 2).sum())
        total += float((s**2).sum())
    expected = (dropped / total) ** 0.5
    record = json.loads((tmp_path / "r2" / "multitune_export.json").read_text())
    assert record["relative_error"] == pytest.approx(expected, rel=1e-4) and 0 < expected < 1
    assert f"rank 2; relative error of the re-factorisation: {expected:.4g}" in out
    assert main(["export", str(run), "--max-rank", "16", "--out", str(tmp_path / "r16")]) == 0  # no larger: as is
    assert json.loads((tmp_path / "r16" / "multitune_export.json").read_text())["relative_error"] == 0.0


def test_dora_and_misplaced_options_are_refused(run_config, tmp_path, capsys):
    raw = run_config(method={"name": "lora", "rank": 4, "dora": True}, train={"max_steps": 1})
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", raw))]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run")]) == 2
    assert "a DoRA update is not a plain LoRA" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--format", "merged", "--max-rank", "2"]) == 2
    assert "--max-rank re-factorises a LoRA: it goes with --format peft-lora" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--format", "merged"]) == 0


def test_the_model_and_every_export_carry_a_model_card(run_config, tmp_path):
    """model/README.md and each export's README.md: the base model, the method, the tasks with
    their prompts, the results with n, the budget; not PEFT's empty template."""
    import json

    from multitune.api import export
    from multitune.config import validate_config
    from multitune.training.loop import train

    cfg = validate_config(run_config(train={"max_steps": 2}, output=str(tmp_path / "run")))
    train(cfg)
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "## Method" in card and "rank: " in card
    assert "| sst2 | classification | `" in card and "| rte | classification |" in card
    results = json.loads((tmp_path / "run" / "results.json").read_text())["fine_tuned"]["tasks"]
    n = results["sst2"]["n"]
    assert f"| sst2 | accuracy | {n} | " in card and "2 steps of " in card
    assert "[More Information Needed]" not in card  # PEFT's template
    out = export(tmp_path / "run", fmt="peft-lora")
    exported = (out / "README.md").read_text()
    assert "library_name: peft" in exported and "| sst2 | accuracy |" in exported


def test_the_bundled_model_is_named_by_its_real_identity():
    from multitune.reporting.model_card import model_identity

    identity = model_identity("smollm2-135m-instruct")
    assert identity["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert identity["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and identity["quantization"] == "Q4_1"
    assert len(identity["gguf_sha256"]) == 64


def test_merged_export_in_half_precision(run_config, tmp_path):
    from safetensors import safe_open

    from multitune.api import export
    from multitune.config import validate_config
    from multitune.errors import MultituneError
    from multitune.training.loop import train

    cfg = validate_config(run_config(train={"max_steps": 1}, eval={"zero_shot": False}, output=str(tmp_path / "run")))
    train(cfg)
    full = export(tmp_path / "run", fmt="merged", out=tmp_path / "fp32")
    half = export(tmp_path / "run", fmt="merged", out=tmp_path / "bf16", dtype="bf16")
    with safe_open(str(half / "model.safetensors"), "pt") as f, safe_open(str(full / "model.safetensors"), "pt") as g:
        names = list(f.keys())
        assert {str(f.get_tensor(n).dtype) for n in names} == {"torch.bfloat16"}
        for n in names[:3]:
            assert (f.get_tensor(n).float() - g.get_tensor(n)).abs().max() <= g.get_tensor(n).abs().max() / 128
    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    with pytest.raises(MultituneError, match="--dtype converts merged weights: it goes with --format merged"):
        export(tmp_path / "run", fmt="peft-lora", dtype="bf16")
