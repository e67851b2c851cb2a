"""Domain adaptation inside `multitune train` on tiny models: DAPT stages, retention, L2-SP,
domain-adversarial and alignment losses."""

import json
import math

import pytest
import torch
from conftest import DATA, task_rte, task_sst2

from multitune import rundir
from multitune.config import validate_config
from multitune.data.sources import Example
from multitune.errors import MultituneError
from multitune.evaluation.retention import retention_examples
from multitune.models.load import load_base, load_trained_model
from multitune.training.checkpoint import list_checkpoints
from multitune.training.loop import train


def _pubmed(n_train: int = 32, n_eval: int = 8) -> dict:
    return {
        "name": "pubmed",
        "kind": "text",
        "data": {"train": str(DATA / "pubmed_abstracts/train.jsonl"), "dev": str(DATA / "pubmed_abstracts/dev.jsonl")},
        "max_train_examples": n_train,
        "max_eval_examples": n_eval,
        "domain": "biomed",
    }


def _records(run_dir, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_a_dapt_stage_feeds_the_next_run(run_config, tmp_path):
    dapt = run_config(
        tasks=[_pubmed()],
        method={"name": "lora", "rank": 4, "dropout": 0.0},
        train={"max_steps": 6, "lr": 5e-3},
        eval={"zero_shot": True},
        output=str(tmp_path / "dapt"),
    )
    results = train(validate_config(dapt))
    ppl = results["zero_shot"]["tasks"]["pubmed"]["perplexity"], results["fine_tuned"]["tasks"]["pubmed"]["perplexity"]
    assert ppl[1] < ppl[0]  # DAPT lowers the domain perplexity
    stage2 = validate_config(run_config(model=str(tmp_path / "dapt"), output=str(tmp_path / "ft")))
    base, tok = load_base(stage2)
    assert (tmp_path / "dapt" / "merged" / "config.json").is_file()
    adapted, _ = load_trained_model(tmp_path / "dapt", rundir.load_run_config(tmp_path / "dapt"))
    ids = torch.tensor([tok("Glucose-6-phosphate dehydrogenase deficiency")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(base.eval()(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4)
    train(stage2)  # fine-tunes a new LoRA on the merged DAPT model; reload goes through the merge too
    model, _ = load_trained_model(tmp_path / "ft", rundir.load_run_config(tmp_path / "ft"))
    conf = json.loads((tmp_path / "ft" / "model" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(tmp_path / "dapt" / "merged")


def test_a_run_of_a_gated_method_is_not_a_base(run_config, tmp_path):
    first = run_config(
        method={"name": "moe_lora", "rank": 4, "experts": 2}, train={"max_steps": 1}, output=str(tmp_path / "a")
    )
    train(validate_config(first))
    with pytest.raises(MultituneError, match="trained with moe_lora; a run used as a base model must be lora"):
        load_base(validate_config(run_config(model=str(tmp_path / "a"))))


def test_retention_perplexity_before_and_after(run_config, tmp_path, tiny_model_dir):
    raw = run_config(
        method={"name": "full"},
        train={"max_steps": 6, "lr": 5e-3, "eval_every": 3},
        retention={"task": "sst2", "max_examples": 6},
    )
    cfg = validate_config(raw)
    results = train(cfg)
    r = results["retention"]
    # reference: exp(mean NLL over all tokens of the texts) with a plain forward of the base model
    from multitune.models.base import load_base_model, load_tokenizer

    model, tok = load_base_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    encoder = rundir.make_encoder(cfg, tok)
    nll = count = 0.0
    for enc in (w for ex in retention_examples(cfg) for w in encoder.windows(Example(ex.task, ex.prompt, None))):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0, :-1]
        labels = torch.tensor(enc.labels[1:])
        nll += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    assert r["before"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert r["after"] != pytest.approx(r["before"], rel=1e-3)
    assert r["change_pct"] == pytest.approx(100 * (r["after"] - r["before"]) / r["before"])
    assert [rec["step"] for rec in _records(tmp_path / "run", "dev") if "retention_perplexity" in rec] == [3, 6]


def test_retention_file_errors_name_the_line(run_config, tmp_path):
    bad = tmp_path / "general.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    cfg = validate_config(run_config(retention={"data": str(bad)}))
    with pytest.raises(MultituneError, match=rf"{bad}:2: field 'text' is missing"):
        retention_examples(cfg)
    with pytest.raises(MultituneError, match="exactly one of 'data'"):
        validate_config(run_config(retention={"data": str(bad), "task": "sst2"}))


def _distance(model_dir, run_dir) -> float:
    from safetensors.torch import load_file

    from multitune.models.base import load_base_model

    base = dict(load_base_model(str(model_dir)).named_parameters())
    tuned = load_file(str(run_dir / "model" / "model.safetensors"))
    return sum(float((tuned[n] - p.detach()).pow(2).sum()) for n, p in base.items() if n in tuned)


def test_l2sp_keeps_full_fine_tuning_near_the_pretrained_weights(run_config, tmp_path, tiny_model_dir):
    for alpha in (None, 50.0):
        train_cfg = {"max_steps": 8, "lr": 3e-3, **({"l2sp": alpha} if alpha else {})}
        train(validate_config(run_config(method={"name": "full"}, train=train_cfg, output=str(tmp_path / f"{alpha}"))))
    free, held = _distance(tiny_model_dir, tmp_path / "None"), _distance(tiny_model_dir, tmp_path / "50.0")
    assert 0 < held < 0.5 * free
    with pytest.raises(MultituneError, match="train.l2sp pulls pre-trained weights back; with lora they are frozen"):
        validate_config(run_config(train={"l2sp": 1.0}))


def _two_domains(method: dict) -> dict:
    return {"domain": {"method": method.pop("method"), **method}}


@pytest.mark.parametrize("method", [{"method": "dann"}, {"method": "coral", "target": "nli"}, {"method": "mmd"}])
def test_domain_losses_train_and_log(method, run_config, tmp_path):
    tasks = [{**task_sst2(), "domain": "reviews"}, {**task_rte(), "domain": "nli"}]
    raw = run_config(tasks=tasks, train={"max_steps": 6, "batch_size": 8, "log_every": 3, **_two_domains(dict(method))})
    train(validate_config(raw))
    logged = [r for r in _records(tmp_path / "run", "train") if "task" not in r]
    assert [r["step"] for r in logged] == [3, 6]
    assert all(math.isfinite(r["domain_loss"]) and r["domain_loss"] >= 0 for r in logged)
    if method["method"] == "dann":
        assert all(0 <= r["domain_accuracy"] <= 1 for r in logged)
    else:
        assert all("domain_accuracy" not in r for r in logged)


def test_dann_resume_is_exact(run_config, tmp_path):
    tasks = [{**task_sst2(), "domain": "reviews"}, {**task_rte(), "domain": "nli"}]
    common = {"max_steps": 6, "save_every": 2, "log_every": 1, "domain": {"method": "dann", "weight": 0.5}}
    for name, stop in (("full", None), ("part", 3)):
        cfg = validate_config(
            run_config(
                tasks=tasks,
                method={"name": "lora", "rank": 4, "dropout": 0.0},
                train=common,
                output=str(tmp_path / name),
            )
        )
        train(cfg, stop_after=stop)
        if stop:
            assert list_checkpoints(tmp_path / name / "checkpoints")[-1].name == "step-00000003"
            train(cfg, resume=True)
    a = [(r["step"], r["loss"], r["domain_loss"]) for r in _records(tmp_path / "full", "train") if "task" not in r]
    b = [(r["step"], r["loss"], r["domain_loss"]) for r in _records(tmp_path / "part", "train") if "task" not in r]
    assert [x[0] for x in a] == [x[0] for x in b]
    for x, y in zip(a, b, strict=True):
        assert x[1:] == pytest.approx(y[1:], abs=1e-6)


def test_domain_config_errors(run_config):
    one = [{**task_sst2(), "domain": "reviews"}, task_rte()]
    with pytest.raises(MultituneError, match="at least two domains"):
        validate_config(run_config(tasks=one, train={"domain": {"method": "dann"}}))
    two = [{**task_sst2(), "domain": "reviews"}, {**task_rte(), "domain": "nli"}]
    with pytest.raises(MultituneError, match="train.domain.target 'web' is not a domain of the tasks"):
        validate_config(run_config(tasks=two, train={"domain": {"method": "coral", "target": "web"}}))
    with pytest.raises(MultituneError, match="does not combine with gradient surgery"):
        validate_config(run_config(tasks=two, train={"domain": {"method": "dann"}, "balance": "pcgrad"}))


def test_replay_of_general_text_is_a_text_task_in_the_mixture(run_config, tmp_path):
    general = {**_pubmed(), "name": "general", "domain": None}
    raw = run_config(
        tasks=[task_sst2(), general],
        mixing={"strategy": "weights", "weights": {"sst2": 0.75, "general": 0.25}},
        train={"max_steps": 8, "batch_size": 8, "log_every": 8},
    )
    train(validate_config(raw))
    rows = {r["task"]: r["rows"] for r in _records(tmp_path / "run", "train") if "task" in r}
    assert rows["sst2"] + rows["general"] == 64 and 8 <= rows["general"] <= 24


def test_dapt_trains_on_every_window_of_long_documents(run_config, capsys):
    cfg = validate_config(
        run_config(
            tasks=[_pubmed(n_train=8, n_eval=2)],
            train={"max_steps": None, "epochs": 1, "batch_size": 4},
            eval={"zero_shot": False},
        )
    )
    from multitune.models.base import load_tokenizer

    encoder = rundir.make_encoder(cfg, load_tokenizer(cfg.model))
    docs = rundir.load_examples(cfg, "train")["pubmed"]
    n = sum(len(encoder.windows(ex)) for ex in docs)
    assert n > 2 * len(docs)  # abstracts run to several windows of 96 tiny-vocabulary tokens
    results = train(cfg)
    assert results["train"]["steps"] == math.ceil(n / 4)  # an epoch is every window once
    assert results["train"]["truncated_rows"] == {"pubmed": 0}
    assert f"[data] pubmed: 8 documents in {n} windows of at most 96 tokens" in capsys.readouterr().out
