"""`multitune affinity` and `multitune compare` on a tiny model."""

import json
import re

import pytest
from conftest import task_rte, task_sst2, write_yaml

from multitune.cli import main


def _three_tasks() -> list[dict]:
    """sst2, an exact copy of it, and a task built to conflict with it: the same prompts with
    other answer words, so a step on one pushes probability mass away from the other's answers."""
    copy = {**task_sst2(), "name": "sst2_copy"}
    other = {
        **task_sst2(),
        "name": "sst2_words",
        "target": "{% if label == 'positive' %}entailment{% else %}not_entailment{% endif %}",
        "labels": ["entailment", "not_entailment"],
    }
    return [task_sst2(), copy, other]


def test_affinity_separates_a_copy_from_a_conflicting_task(run_config, tmp_path, capsys):
    raw = run_config(
        tasks=_three_tasks(),
        method={"name": "lora", "rank": 4, "dropout": 0.0},
        train={"batch_size": 12, "lr": 1e-2},
    )
    cfg = write_yaml(tmp_path / "run.yaml", raw)
    assert main(["affinity", str(cfg), "--steps", "6", "--clusters", "2", "--lookahead-lr", "0.05"]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "run-affinity" / "results.json").read_text())
    z = results["affinity"]["matrix"]  # order: sst2, sst2_copy, sst2_words
    assert "fine_tuned" not in results
    assert z[0][1] > 0 and z[1][0] > 0  # a copy helps
    assert z[0][2] < 0 and z[2][0] < 0 and z[1][2] < 0  # other answer words hurt
    assert "- name: sst2\n    cluster: c1" in out and "- name: sst2_copy\n    cluster: c1" in out
    assert "- name: sst2_words\n    cluster: c2" in out
    assert (tmp_path / "run-affinity" / "affinity.png").is_file()
    assert (tmp_path / "run-affinity" / "affinity.md").read_text().strip() in out


def test_compare_trains_baselines_and_reports_delta_m(run_config, tmp_path, capsys):
    raw = run_config(
        tasks=[task_sst2(), task_rte()],
        mixing={"strategy": "uniform"},
        train={"max_steps": 4},
        eval={"zero_shot": False},
    )
    cfg = write_yaml(tmp_path / "run.yaml", raw)
    assert main(["compare", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"[compare] 1/3 training {tmp_path / 'run-single' / 'sst2'} (sst2, 2 steps)" in out
    assert f"[compare] 3/3 training {tmp_path / 'run'} (sst2, rte, 4 steps)" in out
    table = json.loads((tmp_path / "run" / "compare.json").read_text())
    singles = {}
    for task in ("sst2", "rte"):
        results = json.loads((tmp_path / "run-single" / task / "results.json").read_text())
        assert results["train"]["steps"] == 2  # uniform over 2 tasks: half the rows of 4 steps
        singles[task] = results["fine_tuned"]["tasks"][task]["accuracy"]
    multi = json.loads((tmp_path / "run" / "results.json").read_text())["fine_tuned"]["tasks"]
    rel = {t: 100 * (multi[t]["accuracy"] - singles[t]) / singles[t] for t in singles}
    assert table["delta_m"] == pytest.approx(sum(rel.values()) / 2)
    assert table["below_baseline"] == sum(v < 0 for v in rel.values())
    assert f"Δm {table['delta_m']:+.2f}%" in out
    # a second variant reuses the baselines instead of training them again
    assert (
        main(
            [
                "compare",
                str(cfg),
                "train.balance=pcgrad",
                f"output={tmp_path / 'pc'}",
                "--singles",
                str(tmp_path / "run-single"),
                "--reuse",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    steps = re.findall(r"\[compare\] (\d)/3 (reusing|training)", out)  # k of N runs, a run at a time
    assert steps == [("1", "reusing"), ("2", "reusing"), ("3", "training")] and "(pcgrad balance)" in out
    assert "other settings" not in out and "reused_with_other_settings" not in json.loads(
        (tmp_path / "pc" / "compare.json").read_text()
    )
    # baselines reused at another learning rate: said in the output, compare.md and compare.json
    lr = ["train.lr=0.003", f"output={tmp_path / 'lr'}", "--singles", str(tmp_path / "run-single"), "--reuse"]
    assert main(["compare", str(cfg), *lr]) == 0
    out = capsys.readouterr().out
    single = tmp_path / "run-single" / "sst2"
    assert f"[compare] 1/3 reusing {single}, trained with other settings: train.lr (0.001 -> 0.003)\n" in out
    table = json.loads((tmp_path / "lr" / "compare.json").read_text())
    assert table["reused_with_other_settings"] == {
        str(tmp_path / "run-single" / t): {"train.lr": ["0.001", "0.003"]} for t in ("sst2", "rte")
    }
    assert f"- {single}: train.lr (0.001 -> 0.003)" in (tmp_path / "lr" / "compare.md").read_text()


def test_study_errors_are_one_line(run_config, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "run.yaml", run_config())
    assert main(["affinity", str(cfg), "--clusters", "5"]) == 2
    assert capsys.readouterr().err.strip().endswith("--clusters 5 is more than the 2 tasks of " + str(cfg))


def test_a_reused_run_without_its_config_is_said_so(run_config, tmp_path):
    from multitune import rundir
    from multitune.config import load_config

    cfg = load_config(write_yaml(tmp_path / "run.yaml", run_config(output=str(tmp_path / "done"))))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text('{"fine_tuned": {}}')
    changes = rundir.reused_changes(cfg)
    assert changes == {
        "config.yaml": (
            f"not readable: {tmp_path / 'done'} is not a run directory (no config.yaml)",
            "this comparison's config",
        )
    }
