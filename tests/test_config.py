"""Config validation and command-line overrides: one clear line per mistake."""

import pytest
from conftest import write_yaml

from multitune.config import load_config, validate_config
from multitune.errors import MultituneError


def _error(raw: dict) -> str:
    with pytest.raises(MultituneError) as e:
        validate_config(raw, source="run.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_valid_config_gets_defaults(run_config):
    cfg = validate_config(run_config())
    assert cfg.method.name == "lora" and cfg.method.rank == 4
    assert cfg.task_names == ["sst2", "rte"]
    assert cfg.train.scheduler == "cosine"


def test_unknown_key_names_the_key_and_suggests(run_config):
    assert _error(run_config(train={"lrr": 0.1})) == "run.yaml: unknown key 'train.lrr' (did you mean 'train.lr'?)"
    raw = run_config()
    raw["modle"] = "x"
    assert "unknown key 'modle' (did you mean 'model'?)" in _error(raw)


def test_unknown_key_inside_method_and_task(run_config):
    assert "unknown key 'method.rnak' (did you mean 'method.rank'?)" in _error(
        run_config(method={"name": "lora", "rnak": 2})
    )
    raw = run_config()
    raw["tasks"][1]["promt"] = "x"
    assert "unknown key 'tasks[rte].promt' (did you mean 'tasks[rte].prompt'?)" in _error(raw)


def test_wrong_type_names_the_key(run_config):
    assert _error(run_config(train={"batch_size": "eight"})).startswith("run.yaml: train.batch_size: Input should be")


def test_unknown_method_and_kind(run_config):
    assert "'lora', 'full', 'freeze'" in _error(run_config(method={"name": "lorra"}))
    raw = run_config()
    raw["tasks"][0]["kind"] = "classify"
    assert "tasks[sst2].kind: Input should be 'classification'" in _error(raw)


def test_task_rules(run_config):
    raw = run_config()
    del raw["tasks"][0]["labels"]
    assert "tasks[sst2]: a classification task needs 'labels'" in _error(raw)
    raw = run_config()
    raw["tasks"][1]["name"] = "sst2"
    assert "task names must be unique; repeated: sst2" in _error(raw)
    raw = run_config(train={"early_stopping": {"metric": "mnli/accuracy"}, "eval_every": 2})
    assert "train.early_stopping.metric 'mnli/accuracy'" in _error(raw)
    assert "needs train.eval_every" in _error(run_config(train={"early_stopping": {"metric": "mean"}}))
    assert "freeze trains nothing" in _error(run_config(method={"name": "freeze"}))
    assert _error(run_config(train={"max_length": 512, "pack_length": 256})) == (
        "run.yaml: train.pack_length 256 is shorter than train.max_length 512: a row must fit in a sequence"
    )


def test_overrides_apply_before_validation(tmp_path, run_config):
    path = write_yaml(tmp_path / "run.yaml", run_config())
    cfg = load_config(
        path, ["train.lr=1e-4", "method.rank=16", "tasks.sst2.max_train_examples=10", "tasks.1.labels=[a, b]"]
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.method.rank == 16
    assert cfg.task("sst2").max_train_examples == 10
    assert cfg.task("rte").labels == ["a", "b"]
    with pytest.raises(MultituneError, match="unknown key 'train.lrr'"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(MultituneError, match="no item 'mnli' in 'tasks'"):
        load_config(path, ["tasks.mnli.prompt=x"])
    with pytest.raises(MultituneError, match="must look like key.sub=value"):
        load_config(path, ["train.lr"])


def test_method_override_defaults_to_lora(tmp_path, run_config):
    raw = run_config()
    del raw["method"]
    cfg = load_config(write_yaml(tmp_path / "run.yaml", raw), ["method.rank=2"])
    assert cfg.method.name == "lora" and cfg.method.rank == 2


def test_bad_files(tmp_path):
    with pytest.raises(MultituneError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\ntasks: [\n  - a: b\n")
    with pytest.raises(MultituneError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(MultituneError, match="must be a YAML mapping"):
        load_config(bad)


def test_unknown_task_lookup(run_config):
    cfg = validate_config(run_config())
    with pytest.raises(MultituneError, match="unknown task 'mnli'; this run has: sst2, rte"):
        cfg.task("mnli")
