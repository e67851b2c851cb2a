"""Shared-factor task experts (lora_experts share A / share B, mtl_lora): exactness against a
per-expert reference, task routing, the rank budget, PEFT save/load, and serving one task as a
plain LoRA or a merged model. Tiny models only."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import plain_peft_logits
from peft import LoraConfig, PeftModel, get_peft_model

import multitune.methods.shared_factor.layer as layer_module
from multitune.errors import MultituneError
from multitune.methods.shared_factor import (
    LoraExpertsConfig,
    MtlLoraConfig,
    SharedFactorLinear,
    apply_shared_factor,
    expert_names,
    export_task_lora,
    gate_table,
    merge_task,
    task_id,
    task_ids,
)
from multitune.methods.task_context import task_context
from multitune.models.base import load_base_model

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TASKS = ["sst2", "rte", "mnli"]
VARIANTS = {
    "share-A": ("lora_experts", dict(share="A", experts=3, rank=12)),
    "share-B": ("lora_experts", dict(share="B", experts=3, rank=12)),
    "mtl": ("mtl_lora", dict(up_projections=3, rank=4, temperature=0.5)),
}


def _model(model_dir, variant: str, perturb: bool = True):
    method, options = VARIANTS[variant]
    model = apply_shared_factor(
        load_base_model(str(model_dir)), method, TASKS, say=None, alpha=8, dropout=0.0, targets="all-linear", **options
    )
    if perturb:
        _perturb(model)
    return model


def _perturb(model, seed: int = 0) -> None:
    """Move B (zero at init), the task logits and Lambda (identity at init) as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "_gate." in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "_transform." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def _layers(model) -> list[SharedFactorLinear]:
    return [m for m in model.modules() if isinstance(m, SharedFactorLinear)]


def _ids(model, rows: int = 3, length: int = 9, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=gen)


def _logits(model, ids: torch.Tensor, tasks) -> torch.Tensor:
    with torch.no_grad(), task_context(tasks):
        return model(input_ids=ids).logits


# --- rank budget ------------------------------------------------------------------------------


def test_rank_budget_and_its_errors():
    assert LoraExpertsConfig(task_names=TASKS, rank=16, experts=4).expert_rank() == 4
    assert MtlLoraConfig(task_names=TASKS, rank=8, up_projections=3).expert_rank() == 8
    with pytest.raises(MultituneError, match=r"rank 10 does not split evenly over 4 experts.*use rank 8 or 12") as err:
        LoraExpertsConfig(task_names=TASKS, rank=10, experts=4)
    assert "\n" not in str(err.value)
    with pytest.raises(MultituneError, match="use rank 4$"):
        LoraExpertsConfig(task_names=TASKS, rank=3, experts=4)
    with pytest.raises(MultituneError, match="share must be 'A' or 'B', got 'C'"):
        LoraExpertsConfig(task_names=TASKS, share="C")
    with pytest.raises(MultituneError, match="'common' is reserved"):
        MtlLoraConfig(task_names=["common"])
    with pytest.raises(MultituneError, match="temperature must be > 0"):
        MtlLoraConfig(task_names=TASKS, temperature=0.0)


def test_parameter_counts(tiny_model_dir):
    """lora_experts: the expert side holds exactly the parameters of a LoRA of the same rank's
    factor, the shared side those of one expert; mtl_lora: A (r), n B_i (r), Lambda r x r per task."""
    lora = get_peft_model(load_base_model(str(tiny_model_dir)), LoraConfig(r=12, target_modules="all-linear"))
    lora_a = sum(p.numel() for n, p in lora.named_parameters() if ".lora_A." in n)
    lora_b = sum(p.numel() for n, p in lora.named_parameters() if ".lora_B." in n)

    def count(model, part):
        return sum(p.numel() for n, p in model.named_parameters() if f"_{part}." in n)

    share_a, share_b, mtl = (_model(tiny_model_dir, v, perturb=False) for v in ("share-A", "share-B", "mtl"))
    assert count(share_a, "B") == lora_b and count(share_a, "A") * 3 == lora_a
    assert count(share_b, "A") == lora_a and count(share_b, "B") * 3 == lora_b
    n_layers = len(_layers(mtl))
    assert count(mtl, "A") == lora_a // 3 and count(mtl, "B") == lora_b  # r = 4, three B_i of rank 4
    assert count(mtl, "transform") == n_layers * 3 * 4 * 4 and count(mtl, "gate") == n_layers * 3 * 3
    trainable = {n for n, p in mtl.named_parameters() if p.requires_grad}
    assert trainable and all("mtl_lora_" in n for n in trainable)


# --- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_init_is_the_base_model(tiny_model_dir, variant):
    base = load_base_model(str(tiny_model_dir))
    ids = _ids(base)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    assert torch.equal(_logits(_model(tiny_model_dir, variant, perturb=False), ids, [0, 1, 2]), expected)


@pytest.mark.parametrize(
    "arch,variant", [("llama", "share-A"), ("llama", "mtl"), ("qwen2", "share-B"), ("gpt2", "mtl"), ("gpt2", "share-B")]
)
def test_mixed_task_batch_equals_each_row_alone(tiny_model_dirs, arch, variant):
    model = _model(tiny_model_dirs[arch], variant)
    ids = _ids(model, rows=4)
    tasks = [2, 0, 1, 0]
    mixed = _logits(model, ids, tasks)
    for row, task in enumerate(tasks):
        assert (mixed[row] - _logits(model, ids[row : row + 1], [task])[0]).abs().max() < 1e-5
    assert (_logits(model, ids[:1], [1]) - mixed[:1]).abs().max() > 1e-3  # the task matters
    # one task per row only: ids per token (what moe_lora / cgc_lora take) are a clear error
    with torch.no_grad(), task_context(torch.zeros(1, ids.shape[1], dtype=torch.long)):
        with pytest.raises(RuntimeError, match=r"takes one task id per row \(shape \(batch,\)\), not one per token"):
            model(input_ids=ids[:1])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fused", [True, False])
def test_stacked_layer_equals_a_loop_over_experts(tiny_model_dir, variant, fused, monkeypatch):
    model = _model(tiny_model_dir, variant)
    if not fused:  # the general path (several adapters, autocast, other dtypes) must agree too
        monkeypatch.setattr(layer_module, "plain_inputs", lambda *a: False)
    layer = _layers(model)[3]
    cfg = layer.configs["default"]
    n, r = cfg.n_experts, layer.rank["default"]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    tasks = torch.tensor([1, 2, 1])
    with torch.no_grad(), task_context(tasks):
        fast = layer(x)
        # the papers' form: one factor pair per expert, each task weighting the experts' outputs
        a = layer._part("A")["default"].weight
        b = layer._part("B")["default"].weight
        z = layer._part("gate")["default"]
        slow = layer.get_base_layer()(x)
        for row, t in enumerate(tasks.tolist()):
            w = torch.softmax(z[t] / cfg.temperature, dim=-1)
            for i in range(n):
                if cfg.share == "A":
                    lam = layer._part("transform")["default"][t] if cfg.transform else torch.eye(r)
                    update = x[row] @ a.T @ lam.T @ b[:, i * r : (i + 1) * r].T
                else:
                    update = x[row] @ a[i * r : (i + 1) * r].T @ b.T
                slow[row] += layer.scaling["default"] * w[i] * update
    assert layer.scaling["default"] == 8 / r
    assert (fast - slow).abs().max() < 1e-5


def test_common_fallback_is_uniform_weights_and_no_transform(tiny_model_dir):
    model = _model(tiny_model_dir, "mtl")
    assert task_id(model, "rte") == 1
    with pytest.raises(MultituneError, match="unknown task 'cola'; the model knows: sst2, rte, mnli"):
        task_id(model, "cola")
    assert task_id(model, "cola", "common") == 3 and task_id(model, "cola", "mnli") == 2
    assert task_ids(model, ["mnli", "cola"], "common").tolist() == [2, 3]
    layer = _layers(model)[0]
    assert torch.allclose(layer.weights("default")[3], torch.full((3,), 1 / 3))
    assert torch.equal(layer.transforms("default")[3], torch.eye(4))
    with pytest.raises(MultituneError, match=r"task id out of range: the model has rows 0..3"):
        _logits(model, _ids(model, rows=1), [4])


def test_every_part_learns(tiny_model_dir):
    """From the initial state (B = 0): one backward reaches B; after a step also A, the task
    logits and Lambda, each task's only through its own rows."""
    model = _model(tiny_model_dir, "mtl", perturb=False)
    ids = _ids(model, rows=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        with task_context([0, 2]):
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    layer = _layers(model)[0]
    assert layer.mtl_lora_A["default"].weight.grad.abs().sum() > 0
    lam_grad = layer.mtl_lora_transform["default"].grad
    gate_grad = layer.mtl_lora_gate["default"].grad
    assert lam_grad[0].abs().sum() > 0 and lam_grad[2].abs().sum() > 0 and torch.equal(lam_grad[1], torch.zeros(4, 4))
    assert gate_grad[0].abs().sum() > 0 and torch.equal(gate_grad[1], torch.zeros(3))


# --- save / load / export ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["share-B", "mtl"])
def test_save_and_load_round_trip(tiny_model_dir, tmp_path, variant):
    model = _model(tiny_model_dir, variant)
    ids = _ids(model)
    expected = _logits(model, ids, [0, 1, 2])
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == VARIANTS[variant][0].upper() and saved["task_names"] == TASKS
    loaded = PeftModel.from_pretrained(load_base_model(str(tiny_model_dir)), tmp_path / "adapter")
    assert task_id(loaded, "mnli") == 2
    assert torch.equal(_logits(loaded, ids, [0, 1, 2]), expected)


def test_exported_lora_loads_in_plain_peft_and_merge_matches(tiny_model_dirs, tmp_path):
    jobs, expected = [], {}
    cases = (
        ("llama", "share-A", "rte"),
        ("llama", "share-B", "sst2"),
        ("llama", "mtl", "mnli"),
        ("gpt2", "mtl", "sst2"),
    )
    for arch, variant, task in cases:
        model = _model(tiny_model_dirs[arch], variant)
        ids = _ids(model, rows=2)
        key = f"{arch}-{variant}-{task}"
        expected[key] = _logits(model, ids, [task_id(model, task)] * 2)
        out = export_task_lora(model, task, tmp_path / key)
        config = json.loads((out / "adapter_config.json").read_text())
        r = _layers(model)[0].rank["default"]
        assert config["peft_type"] == "LORA" and config["r"] == r and config["lora_alpha"] / r == pytest.approx(8 / r)
        jobs.append({"key": key, "base": str(tiny_model_dirs[arch]), "adapter": str(out), "ids": ids.tolist()})
        merged = merge_task(model, task)
        assert not any(isinstance(m, SharedFactorLinear) for m in merged.modules())
        with torch.no_grad():
            assert (merged(input_ids=ids).logits - expected[key]).abs().max() <= 1e-4
        assert torch.equal(_logits(model, ids, [task_id(model, task)] * 2), expected[key])  # left intact
    plain = plain_peft_logits(jobs, tmp_path)
    for key, logits in expected.items():
        assert (plain[key] - logits).abs().max() <= 1e-4, key


def test_gate_table_and_options(tiny_model_dir):
    model = _model(tiny_model_dir, "share-B")
    table = gate_table(model)
    assert list(table) == TASKS and all(abs(sum(v) - 1.0) < 1e-5 for v in table.values())
    assert expert_names(model) == ["A0", "A1", "A2"]
    base = load_base_model(str(tiny_model_dir))
    with pytest.raises(MultituneError, match="unknown shared-factor method 'hydra'"):
        apply_shared_factor(base, "hydra", TASKS)
    with pytest.raises(MultituneError, match="it is lora_experts's"):
        apply_shared_factor(base, "mtl_lora", TASKS, experts=2)
    said = []
    apply_shared_factor(base, "lora_experts", TASKS, say=said.append, rank=8, experts=2)
    assert said == [
        "lora_experts: shared A of rank 4, 2 experts B_i of rank 4; every task's update is a rank-4 LoRA, "
        "scaled by alpha / 4"
    ]


def test_config_mistakes_are_one_line_before_any_model_loads(run_config, tmp_path, capsys):
    from conftest import write_yaml

    from multitune.cli import main

    path = write_yaml(tmp_path / "run.yaml", run_config())
    cases = [
        (["method.name=lora_experts", "method.rank=10"], "method: rank 10 does not split evenly over 4 experts"),
        (["method.name=lora_experts", "method.share=C"], "method.share: Input should be 'A' or 'B'; got 'C'"),
        (["method.name=mtl_lora", "method.experts=2"], "unknown key 'method.experts'"),
        (["method.name=mtl_lora", "method.temperature=0"], "method.temperature: Input should be greater than 0"),
    ]
    for overrides, message in cases:
        capsys.readouterr()
        assert main(["train", str(path), *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
