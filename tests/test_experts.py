"""Task-gated LoRA experts (moe_lora, cgc_lora): exactness, task routing, checkpointing, PEFT
save/load, and serving one task as a plain LoRA or a merged model. Tiny models only."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import plain_peft_logits
from peft import LoraConfig, PeftModel, get_peft_model

from multitune.errors import MultituneError
from multitune.methods.experts import (
    CgcLoraConfig,
    ExpertsLinear,
    MoeLoraConfig,
    apply_experts,
    expert_names,
    export_task_lora,
    gate_table,
    merge_task,
    plot_gates,
    split_rank,
    task_id,
    task_ids,
)
from multitune.methods.experts.config import experts_config, gate_row
from multitune.methods.task_context import current_task_context, task_context
from multitune.models.base import load_base_model

# PEFT's get_peft_model reads transformers' deprecated `is_gradient_checkpointing`: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TASKS = ["sst2", "rte", "mnli", "squad"]
CLUSTERS = {"sst2": "sentiment", "rte": "nli", "mnli": "nli"}  # squad: the default cluster


def _model(
    model_dir,
    method: str = "cgc_lora",
    gate: str = "shared",
    rank: int = 12,
    perturb: bool = True,
    gate_norm: str = "softmax",
):
    base = load_base_model(str(model_dir))
    kwargs = dict(rank=rank, alpha=16, dropout=0.0, targets="all-linear", gate=gate, gate_norm=gate_norm)
    if method == "moe_lora":
        kwargs["experts"] = 4
    else:
        kwargs.update(common_experts=1, task_experts=1)
    model = apply_experts(base, method, TASKS, CLUSTERS, say=None, **kwargs)
    if perturb:
        _perturb(model)
    return model


def _perturb(model, seed: int = 0) -> None:
    """Move B (zero at init) and the gates (uniform at init) away from their start, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "lora_gate" in name or "task_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen))


def _ids(model, rows: int = 4, length: int = 9, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=gen)


def _logits(model, ids: torch.Tensor, tasks) -> torch.Tensor:
    with torch.no_grad(), task_context(tasks):
        return model(input_ids=ids).logits


def _layers(model) -> list[ExpertsLinear]:
    return [m for m in model.modules() if isinstance(m, ExpertsLinear)]


def _router(model):
    return _layers(model)[0].routers["default"]


# --- rank budget ------------------------------------------------------------------------------


def test_rank_split_spreads_the_remainder():
    assert split_rank(10, 4) == [3, 3, 2, 2]
    assert split_rank(8, 4) == [2, 2, 2, 2]
    cfg = CgcLoraConfig(rank=13, task_names=TASKS, clusters=CLUSTERS, common_experts=2, task_experts=1)
    layout = cfg.layout()
    # 3 clusters x 2 common + 4 tasks x 1 = 10 experts, 13 slots: the 3 extra go round-robin over clusters
    assert layout.n_experts == 10 and layout.total_rank == 13
    ranks = dict(zip(layout.expert_names, layout.expert_ranks, strict=True))
    assert [ranks[f"{c}/common0"] for c in ("sentiment", "nli", "default")] == [2, 2, 2]
    assert ranks["sentiment/common1"] == 1 and ranks["sst2/task0"] == 1
    text = layout.describe()
    assert "rank per task" in text and "rte=4" in text and "sst2=4" in text


def test_rank_too_small_is_one_clear_error():
    with pytest.raises(MultituneError, match=r"rank 4 is too small for 10 experts") as err:
        CgcLoraConfig(rank=4, task_names=TASKS, clusters=CLUSTERS, common_experts=2, task_experts=1)
    assert "\n" not in str(err.value)
    with pytest.raises(MultituneError, match="experts"):
        MoeLoraConfig(rank=2, experts=4, task_names=TASKS)


@pytest.mark.parametrize("method", ["moe_lora", "cgc_lora"])
def test_parameter_count_equals_one_lora_of_the_same_rank(tiny_model_dir, method):
    rank = 10  # not divisible by the expert count: the remainder is spread, the total stays exact
    experts = _model(tiny_model_dir, method, rank=rank, perturb=False)
    lora = get_peft_model(load_base_model(str(tiny_model_dir)), LoraConfig(r=rank, target_modules="all-linear"))
    ab = sum(p.numel() for n, p in experts.named_parameters() if "_lora_A." in n or "_lora_B." in n)
    plain = sum(p.numel() for n, p in lora.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    assert ab == plain > 0
    assert all(layer.rank["default"] == rank for layer in _layers(experts))


# --- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["moe_lora", "cgc_lora"])
def test_zero_init_is_the_base_model(tiny_model_dir, method):
    base = load_base_model(str(tiny_model_dir))
    ids = _ids(base)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = _model(tiny_model_dir, method, perturb=False)
    assert torch.equal(_logits(model, ids, [0, 1, 2, 3]), expected)


@pytest.mark.parametrize(
    "arch,method,gate",
    [
        ("llama", "cgc_lora", "shared"),
        ("llama", "moe_lora", "per_layer"),
        ("qwen2", "moe_lora", "shared"),
        ("qwen2", "cgc_lora", "per_layer"),
        ("gpt2", "cgc_lora", "shared"),
        ("gpt2", "moe_lora", "shared"),
    ],
)
def test_mixed_task_batch_equals_each_row_alone(tiny_model_dirs, arch, method, gate):
    model = _model(tiny_model_dirs[arch], method, gate)
    ids = _ids(model, rows=4)
    tasks = [2, 0, 3, 0]
    mixed = _logits(model, ids, tasks)
    for row, task in enumerate(tasks):
        alone = _logits(model, ids[row : row + 1], [task])
        assert (mixed[row] - alone[0]).abs().max() < 1e-5
    # and the task matters: the same row under another task gives other logits
    assert (_logits(model, ids[:1], [1]) - mixed[:1]).abs().max() > 1e-3


def _packed_grads(model, ids: torch.Tensor, tasks: torch.Tensor, positions, weights, checkpointing: bool):
    """Gradients of a fixed weighted sum of the logits (rows or packed, as given)."""
    inner = model.get_base_model()
    if checkpointing:  # reentrant: the layers recompute their scales from the ids (see layer.py)
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    else:
        inner.gradient_checkpointing_disable()
    model.train()
    model.zero_grad(set_to_none=True)
    with task_context(tasks):
        (model(input_ids=ids, position_ids=positions, use_cache=False).logits * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("method,gate", [("cgc_lora", "shared"), ("moe_lora", "per_layer"), ("cgc_lora", "per_layer")])
def test_task_ids_per_token_let_one_packed_sequence_hold_several_tasks(tiny_model_dir, method, gate):
    """Rows of different tasks end to end in one sequence (position ids restart at each row) with
    one task id per token: the logits and the gradients are those of the rows given per-row ids."""
    model = _model(tiny_model_dir, method, gate)
    ids, tasks = _ids(model, rows=3, length=7), torch.tensor([2, 0, 3])
    packed, positions = ids.reshape(1, -1), torch.arange(7).repeat(3).unsqueeze(0)
    per_token = tasks.repeat_interleave(7).unsqueeze(0)  # (1, 21)
    with torch.no_grad(), task_context(per_token):
        got = model(input_ids=packed, position_ids=positions, use_cache=False).logits.view(3, 7, -1)
    rows = _logits(model, ids, tasks)
    assert (got - rows).abs().max() < 1e-5
    # each token reads its own id: the last row read as task 2 changes that row only
    with torch.no_grad(), task_context(torch.tensor([2] * 7 + [0] * 7 + [1] * 7).unsqueeze(0)):
        other = model(input_ids=packed, position_ids=positions, use_cache=False).logits.view(3, 7, -1)
    assert (other[:2] - rows[:2]).abs().max() < 1e-5 and (other[2] - rows[2]).abs().max() > 1e-3
    weights = torch.randn(rows.shape, generator=torch.Generator().manual_seed(5))
    for checkpointing in (False, True):
        by_row = _packed_grads(model, ids, tasks, None, weights, checkpointing)
        by_token = _packed_grads(model, packed, per_token, positions, weights.reshape(1, 21, -1), checkpointing)
        assert by_row.keys() == by_token.keys() and any("task_embedding" in n for n in by_row)
        for name, grad in by_row.items():
            assert torch.allclose(grad, by_token[name], atol=1e-5, rtol=1e-4), (checkpointing, name)
    short = r"task ids of shape \(1, 20\) \(one per token\) but a task-gated layer received tokens of shape \(1, 21\)"
    with torch.no_grad(), task_context(torch.zeros(1, 20, dtype=torch.long)), pytest.raises(RuntimeError, match=short):
        model(input_ids=packed, position_ids=positions, use_cache=False)


@pytest.mark.parametrize("method,gate", [("moe_lora", "shared"), ("cgc_lora", "per_layer")])
def test_stacked_layer_equals_a_loop_over_experts(tiny_model_dir, method, gate):
    model = _model(tiny_model_dir, method, gate)
    layer = _layers(model)[3]
    router = layer.routers["default"]
    layout = router.layout
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    tasks = torch.tensor([1, 3, 1])
    with torch.no_grad(), task_context(tasks):
        fast = layer(x)
        # the straightforward reference: one small LoRA per expert, weighted by the task's gate
        gates = router.gates(layer.own_gate("default"))  # (G, E)
        a, b = layer.experts_A["default"].weight, layer.experts_B["default"].weight
        scaling = layer.scaling["default"]
        slow = layer.get_base_layer()(x)
        start = 0
        for e, r in enumerate(layout.expert_ranks):
            a_e, b_e = a[start : start + r], b[:, start : start + r]
            expert_out = x @ a_e.T @ b_e.T  # (rows, tokens, out)
            slow = slow + scaling * gates[tasks, e].view(-1, 1, 1) * expert_out
            start += r
    assert (fast - slow).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["moe_lora", "cgc_lora"])
def test_count_gate_norm_weighs_experts_by_their_number_and_exports_exactly(tiny_model_dir, method):
    model = _model(tiny_model_dir, method, perturb=False, gate_norm="count")
    ids = _ids(model)
    base = load_base_model(str(tiny_model_dir))
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    assert torch.equal(_logits(model, ids, torch.tensor([0, 1, 2, 3])), reference)  # starts at the base model
    _perturb(model)
    layer = _layers(model)[3]
    router = layer.routers["default"]
    allowed = torch.tensor(router.layout.allowed, dtype=torch.float32)
    softmax = router.gates()
    # what multiplies each expert: the softmax times the number of the row's experts (sums to it)
    assert torch.allclose(router.weights(), softmax * allowed.sum(1, keepdim=True))
    assert torch.allclose(router.weights().sum(1), allowed.sum(1))
    # the stacked layer against a loop over experts weighted that way
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    tasks = torch.tensor([1, 3, 0])
    with torch.no_grad(), task_context(tasks):
        fast = layer(x)
        a, b = layer.experts_A["default"].weight, layer.experts_B["default"].weight
        slow, start = layer.get_base_layer()(x), 0
        for e, r in enumerate(router.layout.expert_ranks):
            out = x @ a[start : start + r].T @ b[:, start : start + r].T
            weight = softmax[tasks, e] * allowed[tasks].sum(1)
            slow = slow + layer.scaling["default"] * weight.view(-1, 1, 1) * out
            start += r
    assert (fast - slow).abs().max() < 1e-5
    # and every task's export still equals the gated model
    for task in TASKS:
        rows = [task_id(model, task)] * 2
        with torch.no_grad():
            merged = merge_task(model, task)(input_ids=ids[:2]).logits
        assert (merged - _logits(model, ids[:2], rows)).abs().max() <= 1e-4, task


def test_cgc_gate_sees_only_its_cluster_and_its_own_experts(tiny_model_dir):
    model = _model(tiny_model_dir, "cgc_lora")
    names = expert_names(model)
    router = _router(model)
    gates = router.gates()
    scales = router.scale_table()
    slot_expert = router.layout.slot_expert
    for t, task in enumerate(TASKS):
        cluster = CLUSTERS.get(task, "default")
        mine = {f"{cluster}/common0", f"{task}/task0"}
        for e, name in enumerate(names):
            if name in mine:
                assert gates[t, e] > 0
            else:  # other tasks' specific experts, other clusters' common experts
                assert gates[t, e] == 0
                assert all(scales[t, s] == 0 for s, owner in enumerate(slot_expert) if owner == e)
        assert torch.isclose(gates[t].sum(), torch.tensor(1.0))
    table = gate_table(model)
    assert list(table) == TASKS and all(len(v) == len(names) for v in table.values())
    assert table["rte"][names.index("sentiment/common0")] == 0.0


@pytest.mark.parametrize("gate", ["shared", "per_layer"])
def test_shared_gate_scales_are_computed_once_per_forward(tiny_model_dir, monkeypatch, gate):
    model = _model(tiny_model_dir, "moe_lora", gate)
    router = _router(model)
    calls = []
    original = router.scale_table
    monkeypatch.setattr(router, "scale_table", lambda *a: calls.append(1) or original(*a))
    _logits(model, _ids(model), [0, 1, 2, 3])
    assert len(calls) == (1 if gate == "shared" else len(_layers(model)))


# --- task context -----------------------------------------------------------------------------


def test_no_task_context_is_a_clear_error(tiny_model_dir):
    model = _model(tiny_model_dir, "moe_lora")
    with pytest.raises(RuntimeError, match="task_context"):
        model(input_ids=_ids(model))
    with torch.no_grad(), model.disable_adapter():  # adapters off: no task needed
        model(input_ids=_ids(model))


def test_unknown_task_and_common_fallback(tiny_model_dir):
    model = _model(tiny_model_dir, "cgc_lora")
    with pytest.raises(MultituneError) as err:
        task_id(model, "cola")
    assert str(err.value) == "unknown task 'cola'; the model knows: sst2, rte, mnli, squad"
    assert task_id(model, "rte") == 1
    assert task_ids(model, ["squad", "sst2"]).tolist() == [3, 0]
    common = task_id(model, "cola", fallback="common")
    assert common >= len(TASKS)
    names = expert_names(model)
    gate = _router(model).gates()[common]
    # uniform over the common experts of the default cluster (squad's), nothing else
    assert gate[names.index("default/common0")] == 1.0 and gate.sum() == 1.0
    nli = task_id(model, "cola", fallback="common:nli")
    assert _router(model).gates()[nli][names.index("nli/common0")] == 1.0
    assert task_id(model, "cola", fallback="rte") == 1
    with pytest.raises(MultituneError, match="unknown fallback"):
        task_id(model, "cola", fallback="nope")
    with pytest.raises(MultituneError, match="task id out of range"):
        _logits(model, _ids(model, rows=1), [99])
    logits = _logits(model, _ids(model, rows=2), [common, 0])
    assert torch.isfinite(logits).all()


def test_beams_repeat_rows_and_generate_works(tiny_model_dir):
    model = _model(tiny_model_dir, "cgc_lora")
    model.eval()
    ids = _ids(model, rows=2, length=6)
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=model.config.pad_token_id)
    with torch.no_grad(), task_context([0, 3]):
        greedy = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        beams = model.generate(input_ids=ids, attention_mask=mask, num_beams=2, **kwargs)
    assert greedy.shape == (2, 10) and beams.shape == (2, 10)
    for row, task in enumerate([0, 3]):
        with torch.no_grad(), task_context([task]):
            alone = model.generate(input_ids=ids[row : row + 1], attention_mask=mask[:1], **kwargs)
        assert torch.equal(alone[0], greedy[row])
    with torch.no_grad(), task_context([0, 3]), pytest.raises(RuntimeError, match="3 rows"):
        model(input_ids=_ids(model, rows=3))


# --- gradient checkpointing -------------------------------------------------------------------


def _grads(model, ids, tasks, checkpointing: dict | None, other_thread: bool = False) -> dict[str, torch.Tensor]:
    inner = model.get_base_model()
    if checkpointing is None:
        inner.gradient_checkpointing_disable()
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model.train()
    model.zero_grad(set_to_none=True)
    calls = []
    handle = _layers(model)[0].register_forward_hook(lambda *_: calls.append(1))
    with task_context(tasks):
        loss = model(input_ids=ids, labels=ids).loss
        if other_thread:  # autograd may run the backward on a worker thread, where the context var is unset
            seen = []

            def backward():
                seen.append(current_task_context())
                loss.backward()

            worker = threading.Thread(target=backward)
            worker.start()
            worker.join()
            assert seen == [None]
        else:
            loss.backward()
    handle.remove()
    assert len(calls) == (1 if checkpointing is None else 2)  # checkpointing really recomputed the layer
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("gate", ["shared", "per_layer"])
def test_gradient_checkpointing_gives_the_same_grads(tiny_model_dir, gate):
    model = _model(tiny_model_dir, "cgc_lora", gate)
    ids = _ids(model)
    tasks = [0, 1, 3, 1]
    plain = _grads(model, ids, tasks, None)
    assert any("task_embedding" in n for n in plain) and all(g.abs().sum() > 0 for g in plain.values())
    for kwargs, other_thread in (({"use_reentrant": False}, False), ({"use_reentrant": True}, False), ({}, True)):
        checkpointed = _grads(model, ids, tasks, kwargs or {"use_reentrant": False}, other_thread)
        assert plain.keys() == checkpointed.keys()
        for name, grad in plain.items():
            assert torch.allclose(grad, checkpointed[name], atol=1e-6, rtol=1e-4), (kwargs, other_thread, name)


# --- save / load / export ---------------------------------------------------------------------


@pytest.mark.parametrize("method,gate", [("cgc_lora", "shared"), ("moe_lora", "per_layer")])
def test_save_and_load_round_trip(tiny_model_dir, tmp_path, method, gate):
    model = _model(tiny_model_dir, method, gate)
    ids = _ids(model)
    expected = _logits(model, ids, [0, 1, 2, 3])
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == method.upper() and saved["task_names"] == TASKS
    loaded = PeftModel.from_pretrained(load_base_model(str(tiny_model_dir)), tmp_path / "adapter")
    assert task_id(loaded, "mnli") == 2
    assert torch.equal(_logits(loaded, ids, [0, 1, 2, 3]), expected)


def test_exported_lora_loads_in_plain_peft_and_merge_matches(tiny_model_dirs, tmp_path):
    jobs, expected = [], {}
    cases = (("llama", "cgc_lora", "rte"), ("llama", "moe_lora", "squad"), ("gpt2", "cgc_lora", "sst2"))
    for arch, method, task in cases:
        model = _model(tiny_model_dirs[arch], method)
        ids = _ids(model, rows=2)
        key = f"{arch}-{method}-{task}"
        gated = _logits(model, ids, [task_id(model, task)] * 2)
        expected[key] = gated
        out = export_task_lora(model, task, tmp_path / key)
        config = json.loads((out / "adapter_config.json").read_text())
        rank = experts_config(model).layout().row_rank(gate_row(experts_config(model), task))
        assert config["peft_type"] == "LORA" and config["r"] == rank
        assert config["lora_alpha"] / config["r"] == pytest.approx(16 / 12)
        assert config["base_model_name_or_path"] == str(tiny_model_dirs[arch])
        jobs.append({"key": key, "base": str(tiny_model_dirs[arch]), "adapter": str(out), "ids": ids.tolist()})

        merged = merge_task(model, task)
        assert not any(isinstance(m, ExpertsLinear) for m in merged.modules())
        with torch.no_grad():
            assert (merged(input_ids=ids).logits - gated).abs().max() <= 1e-4
        assert torch.equal(_logits(model, ids, [task_id(model, task)] * 2), gated)  # the experts model is intact

    plain = plain_peft_logits(jobs, tmp_path)
    for key, logits in expected.items():
        assert (plain[key] - logits).abs().max() <= 1e-4, key


def test_apply_experts_checks_its_options(tiny_model_dir):
    base = load_base_model(str(tiny_model_dir))
    with pytest.raises(MultituneError, match="unknown task-gated method"):
        apply_experts(base, "mole", TASKS, None)
    with pytest.raises(MultituneError, match="it is cgc_lora's"):
        apply_experts(base, "moe_lora", TASKS, None, common_experts=2)
    with pytest.raises(MultituneError, match="clusters name unknown tasks: cola"):
        apply_experts(base, "cgc_lora", TASKS, {"cola": "x"}, rank=16)
    said = []
    apply_experts(base, "cgc_lora", TASKS, CLUSTERS, say=said.append, rank=16, common_experts=1, task_experts=1)
    assert "rank per task" in said[0]


def test_gate_plot(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir, "moe_lora", "per_layer")
    table = gate_table(model)
    assert all(abs(sum(v) - 1.0) < 1e-5 for v in table.values())
    path = plot_gates(table, tmp_path / "gates.png", expert_names(model))
    assert path.stat().st_size > 1000
