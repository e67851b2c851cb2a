"""bench/quality.py's own logic (the study's runs themselves are not retrained in tests)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_study_seed_is_the_one_of_study_yaml():
    q = _quality()
    assert q.STUDY_SEED == yaml.safe_load(q.STUDY.read_text())["train"]["seed"]


def test_a_run_from_before_seeds_becomes_its_seed_dir_once(tmp_path, capsys):
    q = _quality()
    finished, unfinished = tmp_path / "lora-r16", tmp_path / "cgc"
    finished.mkdir()
    unfinished.mkdir()
    results = {"fine_tuned": {"tasks": {"sst2": {"accuracy": 89.8}}}}
    (finished / "results.json").write_text(json.dumps(results))
    (finished / "config.yaml").write_text("output: x\n")
    (unfinished / "results.json").write_text(json.dumps({"zero_shot": {}}))  # stopped before its final eval
    for run in (finished, unfinished, tmp_path / "absent"):
        q._seed_dir_from_before(run, 0)
    assert json.loads((finished / "seed-0" / "results.json").read_text()) == results
    assert (finished / "seed-0" / "config.yaml").read_text() == "output: x\n"
    assert not (unfinished / "seed-0").exists() and not (tmp_path / "absent").exists()
    (finished / "seed-0" / "results.json").write_text("{}")  # a seed-0 run of its own is never replaced
    q._seed_dir_from_before(finished, 0)
    assert (finished / "seed-0" / "results.json").read_text() == "{}"
    assert capsys.readouterr().out.count("reusing") == 1
