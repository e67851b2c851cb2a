"""End-to-end training on tiny random models: losses, resume, methods, architectures, saving."""

import json

import pytest
import torch
from conftest import task_squad, task_sst2, write_yaml

from multitune import rundir
from multitune.cli import main
from multitune.config import validate_config
from multitune.data.collate import _cells, collate, pack
from multitune.data.sources import Example
from multitune.errors import MultituneError
from multitune.methods import apply_method, count_parameters
from multitune.models.base import load_base_model, load_tokenizer
from multitune.models.forward import per_row_nll, target_logprobs
from multitune.models.load import load_trained_model
from multitune.training.checkpoint import list_checkpoints
from multitune.training.loop import train


def _losses(run_dir) -> list[tuple[int, str, float]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["split"] == "train":
            out.append((r["step"], r.get("task", "*"), r["loss"]))
    return out


def test_training_reduces_loss_and_writes_the_run(run_config):
    cfg = validate_config(
        run_config(
            method={"name": "full"},
            train={"max_steps": 40, "lr": 3e-3, "log_every": 10},
            eval={"zero_shot": True},
        )
    )
    results = train(cfg)
    run = rundir.Path(cfg.output)
    for name in ("config.yaml", "metrics.jsonl", "results.json", "results.md", "model/config.json"):
        assert (run / name).exists(), name
    overall = [loss for step, task, loss in _losses(run) if task == "*"]
    assert len(overall) == 4 and overall[-1] < overall[0] - 0.5, overall
    per_task = {task for _, task, _ in _losses(run)}
    assert per_task == {"*", "sst2", "rte"}
    assert set(results) == {"zero_shot", "fine_tuned", "train", "environment"}
    assert set(results["fine_tuned"]["tasks"]) == {"sst2", "rte"}
    assert results["fine_tuned"]["tasks"]["sst2"]["n"] == 16
    assert "| sst2 | accuracy |" in (run / "results.md").read_text()
    # truncation is counted per task: recount with the encoder
    enc = rundir.make_encoder(cfg, load_tokenizer(cfg.model))
    rte_rows = rundir.load_examples(cfg, "train")["rte"]
    assert results["train"]["truncated_rows"]["rte"] == sum(enc.encode(ex).truncated for ex in rte_rows) > 0
    assert list((run / "tb").iterdir()), "TensorBoard events are written"


def test_lora_parameter_count_is_exact(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir))
    _, total_before = count_parameters(model)
    cfg = validate_config({"tasks": [{"name": "t", "kind": "text", "data": {"train": "x"}}], "method": {"rank": 4}})
    model = apply_method(model, cfg.method)
    trainable, total = count_parameters(model)
    # per layer: q(64->64) k(64->32) v(64->32) o(64->64) gate/up(64->128) down(128->64), r * (in + out) each
    per_layer = 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert trainable == 2 * per_layer
    assert total == total_before + trainable


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(run_config, tmp_path):
    common = {"max_steps": 8, "save_every": 2, "log_every": 3, "grad_accum": 2}
    full = validate_config(run_config(train=common, output=str(tmp_path / "full")))
    train(full)
    part = validate_config(run_config(train=common, output=str(tmp_path / "part")))
    train(part, stop_after=5)
    assert [p.name for p in list_checkpoints(tmp_path / "part/checkpoints")] == ["step-00000004", "step-00000005"]
    assert not (tmp_path / "part/model").exists()
    train(part, resume=True)
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert [(s, t) for s, t, _ in a] == [(s, t) for s, t, _ in b]
    for (_, _, x), (_, _, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-6)
    from safetensors.torch import load_file

    fa = load_file(str(tmp_path / "full/model/adapter_model.safetensors"))
    fb = load_file(str(tmp_path / "part/model/adapter_model.safetensors"))
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.allclose(fa[k], fb[k], atol=1e-6), k


def test_output_dir_is_protected(run_config, tmp_path):
    cfg_path = write_yaml(tmp_path / "run.yaml", run_config(train={"max_steps": 1}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("earlier results")
    assert main(["train", str(cfg_path)]) == 2
    assert (tmp_path / "run" / "keep.txt").read_text() == "earlier results"
    assert main(["train", str(cfg_path), "--resume"]) == 2  # nothing to resume there
    assert main(["train", str(cfg_path), "--overwrite"]) == 2  # not a run: never emptied
    assert (tmp_path / "run" / "keep.txt").read_text() == "earlier results"
    (tmp_path / "run" / "keep.txt").unlink()
    assert main(["train", str(cfg_path)]) == 0
    first = (tmp_path / "run" / "metrics.jsonl").stat().st_mtime_ns
    assert main(["train", str(cfg_path), "--overwrite"]) == 0  # a run: replaced
    assert (tmp_path / "run" / "model").is_dir()
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_mtime_ns != first


def test_cli_errors_are_one_line(run_config, tmp_path, capsys):
    raw = run_config()
    raw["train"]["lrr"] = 1
    assert main(["train", str(write_yaml(tmp_path / "bad.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"multitune: error: {tmp_path / 'bad.yaml'}: unknown key 'train.lrr' (did you mean 'train.lr'?)"
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"text": "x", "label": "positive"}\n{"text": "y", "label": "meh"}\n')
    raw = run_config()
    raw["tasks"][0]["data"]["train"] = str(bad_data)
    assert main(["train", str(write_yaml(tmp_path / "r.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"multitune: error: {bad_data}:2: field 'label' has label 'meh'") and "\n" not in err
    assert not (tmp_path / "run").exists(), "nothing is written before the data is valid"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_each_architecture_trains(arch, tiny_model_dirs, run_config, tmp_path):
    raw = run_config(model=str(tiny_model_dirs[arch]), train={"max_steps": 3}, tasks=[task_squad(8, 3)])
    results = train(validate_config(raw))
    assert results["train"]["steps"] == 3
    assert set(results["fine_tuned"]["tasks"]["squad"]) == {"exact_match", "f1", "n"}


def test_a_rows_loss_is_the_mean_or_the_sum_of_its_target_tokens_nll():
    logp = torch.tensor([-1.0, -2.0, -3.0, -0.5])
    rows = torch.tensor([0, 0, 0, 1])
    assert per_row_nll(logp, rows, 3).tolist() == [2.0, 0.5, 0.0]  # row 2 has no target token
    assert per_row_nll(logp, rows, 3, "sum").tolist() == [6.0, 0.5, 0.0]


def test_row_loss_sum_trains_on_the_whole_targets_nll(run_config, tmp_path, tiny_model_dir):
    """train.row_loss reaches the step: the same first batch at the same weights, its loss with
    `sum` is the target length times its loss with `mean` when every target has that length."""
    from multitune.data.encode import Encoder

    task = {**task_sst2(), "target": "{{ label[0] }}", "labels": ["n", "p"]}  # one letter + end of turn
    enc = Encoder(load_tokenizer(str(tiny_model_dir)), {"sst2": 0}, 96)
    lengths = {len(enc.target_ids(label)) for label in task["labels"]}
    assert lengths == {2}, lengths
    first = {}
    for how in ("mean", "sum"):
        raw = run_config(tasks=[task], train={"max_steps": 1, "row_loss": how}, output=str(tmp_path / how))
        train(validate_config(raw))
        lines = map(json.loads, (tmp_path / how / "metrics.jsonl").read_text().splitlines())
        first[how] = next(r["loss"] for r in lines if r["split"] == "train" and r.get("task") == "sst2")
    assert first["sum"] == pytest.approx(2 * first["mean"], rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_target_logprobs_ignore_padding(arch, tiny_model_dirs):
    model = load_base_model(str(tiny_model_dirs[arch])).eval()
    tok = load_tokenizer(str(tiny_model_dirs[arch]))
    from multitune.data.encode import Encoder

    enc = Encoder(tok, {"t": 0}, 64)
    rows = [enc.encode(Example("t", p, "positive")) for p in ("a long prompt with many words in it", "short")]
    with torch.no_grad():
        logp, idx = target_logprobs(model, collate(rows, tok.pad_token_id))
        together = per_row_nll(logp, idx, 2)
        alone = [per_row_nll(*target_logprobs(model, collate([r], tok.pad_token_id)), 1) for r in rows]
        # reference: full logits, plain cross-entropy on the unpadded row
        ref = []
        for r in rows:
            logits = model(input_ids=torch.tensor([r.input_ids])).logits[0, :-1]
            ref.append(torch.nn.functional.cross_entropy(logits, torch.tensor(r.labels[1:]), ignore_index=-100))
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)
    assert torch.allclose(together, torch.stack(ref), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_the_models_own_forward_gives_the_target_logprobs_of_the_split_one(arch, tiny_model_dirs, monkeypatch):
    """DDP and FSDP go through the model's own forward (logits only where a target is predicted,
    a boolean logits_to_keep); one process calls the decoder and the LM head apart: the same."""
    import multitune.models.forward as forward
    from multitune.data.encode import Encoder

    model = load_base_model(str(tiny_model_dirs[arch])).eval()
    tok = load_tokenizer(str(tiny_model_dirs[arch]))
    enc = Encoder(tok, {"t": 0}, 64)
    texts = ["a long prompt with many words in it", "short", "a third one here", "x y"]
    rows = [enc.encode(Example("t", p, "positive negative"[: 4 + 3 * i])) for i, p in enumerate(texts)]
    width = max(len(r.input_ids) for r in rows)
    for batch in (collate(rows, tok.pad_token_id), pack(rows, tok.pad_token_id, length=2 * width, by_task=False)):
        with torch.no_grad():
            split, split_rows, split_pooled = forward.target_logprobs_and_pooled(model, batch, 1)
            with monkeypatch.context() as m:
                m.setattr(forward, "_decoder_and_head", lambda model: None)
                own, own_rows, own_pooled = forward.target_logprobs_and_pooled(model, batch, 1)
        assert torch.equal(split_rows, own_rows) and split.shape == own.shape == (int((batch.labels != -100).sum()),)
        assert torch.allclose(split, own, atol=1e-5) and torch.allclose(split_pooled, own_pooled, atol=1e-6)


@pytest.mark.parametrize("arch,by_task", [("llama", False), ("llama", True), ("qwen2", False), ("gpt2", True)])
def test_packed_rows_give_the_losses_of_the_rows_alone(arch, by_task, tiny_model_dirs):
    model = load_base_model(str(tiny_model_dirs[arch])).eval()
    tok = load_tokenizer(str(tiny_model_dirs[arch]))
    from multitune.data.encode import Encoder

    enc = Encoder(tok, {"a": 0, "b": 1}, 64)
    texts = ["a long prompt with many words in it and more", "short", "a third one", "x y z w", "one more row"]
    rows = [enc.encode(Example("ab"[i % 2], p, "positive negative"[: 4 + i])) for i, p in enumerate(texts)]
    width = max(len(r.input_ids) for r in rows)
    packed = pack(rows, tok.pad_token_id, length=2 * width, by_task=by_task)
    assert packed.packed and packed.input_ids.shape[0] < len(rows)  # rows do share sequences
    mixed = 0
    for s in range(packed.input_ids.shape[0]):
        members = packed.row_ids[s][packed.row_ids[s] >= 0].unique()
        mixed += len(set(packed.row_task_ids[members].tolist())) > 1
    assert mixed == 0 if by_task else mixed > 0  # by_task: never two tasks in one sequence
    # what task_context gets: each sequence's task, or each token's where sequences mix tasks
    real = packed.row_ids >= 0
    if by_task:
        assert packed.one_task and torch.equal(packed.context_ids(), packed.task_ids)
    else:
        assert not packed.one_task and packed.context_ids().shape == packed.input_ids.shape
        assert torch.equal(packed.context_ids()[real], packed.row_task_ids[packed.row_ids[real]])
    assert packed.row_tokens().tolist() == [len(r.input_ids) for r in rows]
    with torch.no_grad():
        got = per_row_nll(*target_logprobs(model, packed), len(rows))
        alone = [per_row_nll(*target_logprobs(model, collate([r], tok.pad_token_id)), 1) for r in rows]
        padded = per_row_nll(*target_logprobs(model, collate(rows, tok.pad_token_id)), len(rows))
    assert torch.allclose(got, torch.cat(alone), atol=1e-5)
    assert torch.allclose(got, padded, atol=1e-5)
    # without the row boundaries (one long causal sequence) the losses differ: the test can fail
    leaky = pack(rows, tok.pad_token_id, length=2 * width)
    leaky.position_ids = torch.arange(leaky.input_ids.shape[1]).expand_as(leaky.input_ids).clone()
    with torch.no_grad():
        mixed = per_row_nll(*target_logprobs(model, leaky), len(rows))
    assert not torch.allclose(mixed, got, atol=1e-3)


def test_packing_picks_the_sequence_length_with_the_fewest_padding_cells():
    from multitune.data.encode import Encoded

    # one mixed 8-row step of bench/throughput.py: 1,541 tokens
    lengths = [50, 81, 156, 165, 220, 250, 304, 315]
    rows = [Encoded(list(range(1, n + 1)), [-100] * n, i % 2, False) for i, n in enumerate(lengths)]
    batch = pack(rows, 0, length=512)
    # first fit into 512-token sequences: 4 x 510 cells (24% padding); five 321-token ones: 4%
    assert tuple(batch.input_ids.shape) == (5, 321)
    assert batch.row_tokens().tolist() == lengths
    assert int((batch.row_ids >= 0).sum()) == sum(lengths)
    for i, n in enumerate(lengths):
        seq, at = (batch.row_ids == i).nonzero()[:, 0], (batch.row_ids == i).nonzero()[:, 1]
        assert seq.unique().numel() == 1 and batch.input_ids[seq[0], at].tolist() == list(range(1, n + 1))
        assert batch.position_ids[seq[0], at].tolist() == list(range(n))
    # a row as long as max_length keeps max_length sequences; by_task keeps tasks apart
    assert pack(rows + [Encoded([1] * 512, [-100] * 512, 0, False)], 0, 512).input_ids.shape[1] == 512
    by_task = pack(rows, 0, length=512, by_task=True)
    for s in range(by_task.input_ids.shape[0]):
        members = by_task.row_ids[s][by_task.row_ids[s] >= 0].unique()
        assert len(set(by_task.row_task_ids[members].tolist())) == 1
    # in 2048-token sequences (the default on a CPU) the step is one sequence, without padding
    assert tuple(pack(rows, 0, length=2048).input_ids.shape) == (1, sum(lengths))
    groups = [r.task_id for r in rows]
    assert (
        by_task.input_ids.numel()
        == min(_cells(lengths, groups, c)[0] for c in range(315, 513))
        < _cells(lengths, groups, 512)[0]
    )


def test_pack_length_defaults_to_one_long_sequence_only_where_attention_skips_other_rows(tiny_model_dir, run_config):
    from transformers import AutoModelForCausalLM

    from multitune.training.batching import pack_length as _pack_length

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = validate_config(run_config(train={"max_length": 512}))
    model = load_base_model(str(tiny_model_dir))  # query-block attention on a CPU
    assert (_pack_length(cfg, model, cpu), _pack_length(cfg, model, cuda)) == (2048, 512)
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert _pack_length(cfg, eager, cpu) == 512
    assert _pack_length(validate_config(run_config(train={"max_length": 4096})), model, cpu) == 4096
    assert _pack_length(validate_config(run_config(train={"pack_length": 1024})), model, cpu) == 1024


def _assert_same_losses_either_way(run_config, method: str, option: str, steps: int) -> None:
    """Train twice, with train.<option> on and off: the logged losses agree step by step."""
    runs = {}
    for value in (True, False):
        raw = run_config(
            method={"name": method, "rank": 4, "dropout": 0.0},
            train={"max_steps": steps, "lr": 1e-2, "log_every": 1, option: value},
            eval={"zero_shot": False},
            output=str(rundir.Path(run_config()["output"]).parent / f"{option}-{value}"),
        )
        train(validate_config(raw))
        runs[value] = _losses(rundir.Path(raw["output"]))
    assert [k[:2] for k in runs[True]] == [k[:2] for k in runs[False]]
    for (_, _, a), (_, _, b) in zip(runs[True], runs[False], strict=True):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("method", ["lora", "moe_lora", "cgc_lora", "mtl_lora"])
def test_packed_training_matches_padded_training(method, run_config):
    """Same rows, same steps: packing changes the layout, not the numbers (moe_lora / cgc_lora
    read a task per token of sequences that mix tasks, mtl_lora one task per packed sequence)."""
    _assert_same_losses_either_way(run_config, method, "packing", steps=4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "moe_lora"])
def test_compiled_layers_train_like_eager_ones(method, run_config):
    """train.compile: the decoder layers run compiled (dynamic shapes: packed batches change
    length every step) and give the eager losses."""
    _assert_same_losses_either_way(run_config, method, "compile", steps=3)


def test_full_and_freeze_methods(run_config, tiny_model_dir):
    model = load_base_model(str(tiny_model_dir))
    _, total = count_parameters(model)
    cfg = validate_config(
        run_config(method={"name": "freeze", "last_layers": 1, "modules": [r"^model\.norm\.weight$"]})
    )
    frozen = apply_method(model, cfg.method)
    names = [n for n, p in frozen.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in names)
    assert any(n.startswith("model.layers.1.") for n in names) and "model.norm.weight" in names
    trainable, _ = count_parameters(frozen)
    layer = sum(p.numel() for p in model.model.layers[1].parameters())
    assert trainable == layer + 64
    cfg = validate_config(run_config(method={"name": "full"}))
    assert count_parameters(apply_method(load_base_model(str(tiny_model_dir)), cfg.method)) == (total, total)
    results = train(validate_config(run_config(method={"name": "freeze", "last_layers": 1}, train={"max_steps": 2})))
    assert results["train"]["trainable_parameters"] == layer
    reloaded = load_base_model(str(rundir.Path(run_config()["output"]) / "model"))
    assert count_parameters(reloaded)[1] == total


def test_saved_adapter_loads_in_plain_peft(run_config):
    from peft import PeftModel

    cfg = validate_config(run_config(train={"max_steps": 4, "lr": 5e-3}))
    train(cfg)
    run = rundir.Path(cfg.output)
    ours, tok = load_trained_model(run, cfg)
    assert {type(m).__name__ for m in ours.modules() if "lora_A" in m._modules} == {"FusedLoraLinear"}
    conf = json.loads((run / "model/adapter_config.json").read_text())
    base = load_base_model(conf["base_model_name_or_path"])
    plain = PeftModel.from_pretrained(base, str(run / "model")).eval()
    ids = tok("Review: a truly great film", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, plain(input_ids=ids).logits
        base_logits = load_base_model(conf["base_model_name_or_path"])(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)  # the fused forward: the same sum, rounded differently
    assert not torch.allclose(a, base_logits, atol=1e-4), "the adapter changed the model"


def test_early_stopping_restores_the_best_weights(run_config):
    cfg = validate_config(
        run_config(
            train={
                "max_steps": 40,
                "lr": 0.5,
                "eval_every": 2,
                "early_stopping": {"metric": "sst2/accuracy", "patience": 2},
            }
        )
    )
    train(cfg)
    lines = [json.loads(x) for x in (rundir.Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r["split"] == "dev" and r.get("task") == "sst2"]
    last_step = max(r["step"] for r in lines)
    assert last_step < 40, "stopped early"
    best = max(r["accuracy"] for r in evals)
    final = json.loads((rundir.Path(cfg.output) / "results.json").read_text())["fine_tuned"]["tasks"]["sst2"]
    assert final["accuracy"] == pytest.approx(best)


@pytest.mark.parametrize("switch", ["dora", "rslora"])
def test_lora_variants_reach_peft(switch, run_config):
    cfg = validate_config(
        run_config(method={"name": "lora", "rank": 4, "alpha": 8, switch: True, "targets": ["q_proj", "v_proj"]})
    )
    model = apply_method(load_base_model(cfg.model), cfg.method)
    peft_cfg = model.peft_config["default"]
    assert peft_cfg.use_dora is (switch == "dora") and peft_cfg.use_rslora is (switch == "rslora")
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = 8 / 4**0.5 if switch == "rslora" else 8 / 4
    assert layer.scaling["default"] == pytest.approx(expected)
    results = train(validate_config(run_config(method=cfg.method.model_dump(), train={"max_steps": 2})))
    assert results["train"]["steps"] == 2


def test_unreachable_hub_dataset_is_one_clear_error(run_config, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    raw = run_config()
    raw["tasks"][0]["data"] = {"hf_dataset": "no-such-user/no-such-dataset", "train": "train"}
    with pytest.raises(
        MultituneError, match=r"task 'sst2': could not load dataset 'no-such-user/no-such-dataset' split 'train'"
    ):
        train(validate_config(raw))


@pytest.mark.parametrize(
    "method", [{"name": "lora", "rank": 4, "dropout": 0.0}, {"name": "cgc_lora", "rank": 4, "dropout": 0.0}]
)
def test_gradient_checkpointing_gives_the_same_losses(method, run_config, tmp_path):
    plain = run_config(method=method, train={"max_steps": 3, "lr": 1e-2}, output=str(tmp_path / "a"))
    ckpt = run_config(
        method=method, train={"max_steps": 3, "lr": 1e-2, "gradient_checkpointing": True}, output=str(tmp_path / "b")
    )
    train(validate_config(plain))
    train(validate_config(ckpt))
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) > 0
    for (_, _, x), (_, _, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_target_presets_pick_blocks_not_names(arch, tiny_model_dirs):
    from multitune.methods.targets import resolve_targets

    model = load_base_model(str(tiny_model_dirs[arch]))
    attention, mlp = resolve_targets(model, "attention"), resolve_targets(model, "mlp")
    if arch == "llama":
        assert attention == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
        assert mlp == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    else:  # GPT-2's c_proj exists in both blocks: the preset keeps them apart
        assert attention == [f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("c_attn", "c_proj")]
        assert mlp == [f"transformer.h.{i}.mlp.{p}" for i in range(2) for p in ("c_fc", "c_proj")]
    assert resolve_targets(model, "all-linear") == "all-linear"
    cfg = validate_config(
        {"tasks": [{"name": "t", "kind": "text", "data": {"train": "x"}}], "method": {"targets": "mlp", "rank": 2}}
    )
    peft_model = apply_method(model, cfg.method)
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert {n.removeprefix("base_model.model.") for n in lora_layers} == set(mlp)


@pytest.mark.parametrize(
    "spec, gate_params",
    [
        ({"name": "cgc_lora", "rank": 8, "common_experts": 1, "task_experts": 1}, 2),  # embedding + shared gate
        ({"name": "moe_lora", "rank": 8, "experts": 2, "gate": "per_layer"}, 1 + 14),  # embedding + a gate per layer
        ({"name": "lora_experts", "rank": 8, "experts": 2}, 14),  # task logits in every layer
        ({"name": "mtl_lora", "rank": 4, "up_projections": 2}, 14),
    ],
)
def test_gate_lr_ratio_moves_the_gate_that_many_times_faster(run_config, spec, gate_params):
    from multitune.methods import param_groups

    cfg = validate_config(run_config(method={**spec, "dropout": 0.0, "gate_lr_ratio": 10}))
    model = apply_method(load_base_model(cfg.model), cfg.method, cfg.tasks)
    groups = param_groups(model, cfg.method, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-2)]
    gate = [names[id(p)] for p in groups[1]["params"]]
    assert len(gate) == gate_params and all("_gate." in n or "_task_embedding." in n for n in gate)
    assert not any("gate_proj" in n.split("_gate.")[-1] for n in gate)  # Llama's gate_proj is not a gate
    # B starts at 0, so the gate's first gradient comes at step 2; AdamW then moves every entry by
    # lr x m_hat / sqrt(v_hat) = lr x (0.1 / 0.19) / sqrt(0.001 / 0.001999) = 0.7441 lr, whatever the gradient
    assert _gate_move_after_two_steps(model, groups, gate, cfg) == pytest.approx(0.7441e-2, rel=1e-3)
    plain = apply_method(load_base_model(cfg.model), cfg.method, cfg.tasks)
    one_group = param_groups(plain, cfg.method.model_copy(update={"gate_lr_ratio": None}), 1e-3)
    assert len(one_group) == 1
    assert _gate_move_after_two_steps(plain, one_group, gate, cfg) == pytest.approx(0.7441e-3, rel=1e-3)


def _gate_move_after_two_steps(model, groups: list[dict], gate: list[str], cfg) -> float:
    from multitune.methods.registry import method
    from multitune.methods.task_context import task_context

    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in gate}
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    rows = method(cfg.method.name).task_ids(model, cfg.task_names, None)
    for _ in range(2):
        with task_context(torch.tensor([rows["sst2"], rows["rte"]])):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if n in gate)


def test_lora_plus_puts_b_in_a_faster_group(run_config):
    from multitune.methods import param_groups

    cfg = validate_config(run_config(method={"name": "lora", "rank": 4, "lora_plus_ratio": 16}))
    model = apply_method(load_base_model(cfg.model), cfg.method)
    groups = param_groups(model, cfg.method, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1.6e-2)]
    assert all("lora_A" in names[id(p)] for p in groups[0]["params"])
    assert all("lora_B" in names[id(p)] for p in groups[1]["params"]) and len(groups[1]["params"]) == 14
    assert len(param_groups(model, validate_config(run_config()).method, 1e-3)) == 1
    assert (
        train(validate_config(run_config(method=cfg.method.model_dump(), train={"max_steps": 2})))["train"]["steps"]
        == 2
    )
