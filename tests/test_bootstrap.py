"""Seeds and the paired bootstrap (multitune/analysis/bootstrap.py), on examples small enough to
work out by hand, and `multitune compare --seeds` end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import task_rte, task_sst2, write_yaml

from multitune.analysis.bootstrap import mean_std, paired_bootstrap, seed_mean_rows
from multitune.analysis.experiments import compare_seeds
from multitune.cli import main
from multitune.errors import MultituneError


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([88.5]) == (88.5, 0.0)
    assert mean_std([90.0, 92.0]) == pytest.approx((91.0, 2**0.5))


def test_seed_mean_rows():
    assert seed_mean_rows([[100, 0, 100], [0, 0, 100]]).tolist() == [50.0, 0.0, 100.0]
    with pytest.raises(MultituneError, match="different numbers of rows"):
        seed_mean_rows([[100, 0], [100]])


def test_two_rows_by_hand():
    # a scores rows (100, 0), b scores (50, 50). A resample of two rows gives a the mean 100 with
    # probability 1/4, 50 with 1/2, 0 with 1/4; b always 50. So Δ is +50 / 0 / -50 with 1/4, 1/2,
    # 1/4: the 95% interval is [-50, +50] and a is better in a quarter of the resamples.
    out = paired_bootstrap({"t": np.array([100.0, 0.0])}, {"t": np.array([50.0, 50.0])}, {"t": True})
    task = out["tasks"]["t"]
    assert task["delta"] == [-50.0, 50.0]
    assert task["relative_delta"] == [-100.0, 100.0]
    assert task["p_better"] == pytest.approx(0.25, abs=0.03)
    assert out["delta_m"] == [-100.0, 100.0]


def test_delta_m_is_the_mean_of_the_tasks_relative_gaps():
    # task x: identical rows, gap always 0; task y as above (-100 / 0 / +100 %): Δm = -50 / 0 / +50 %
    same = np.array([100.0, 0.0, 100.0])
    out = paired_bootstrap(
        {"x": same, "y": np.array([100.0, 0.0])}, {"x": same, "y": np.array([50.0, 50.0])}, {"x": True, "y": True}
    )
    assert out["tasks"]["x"]["delta"] == [0.0, 0.0] and out["tasks"]["x"]["p_better"] == 0.0
    assert out["delta_m"] == [-50.0, 50.0]


def test_lower_is_better_flips_the_sign():
    out = paired_bootstrap({"ppl": np.array([10.0, 10.0])}, {"ppl": np.array([20.0, 20.0])}, {"ppl": False})
    assert out["tasks"]["ppl"]["delta"] == [-10.0, -10.0]  # a - b in metric units
    assert out["tasks"]["ppl"]["relative_delta"] == [50.0, 50.0]  # but a is 50% better
    assert out["p_better"] == 1.0


def test_a_clear_gain_excludes_zero():
    # 100 paired rows: both right on 50, only a right on 40, both wrong on 10. The per-row
    # difference is 100 with probability 0.4, so Δ ~ 40 ± 1.96 * 100 * sqrt(0.4 * 0.6 / 100) = 40 ± 9.6
    a = np.array([100.0] * 90 + [0.0] * 10)
    b = np.array([100.0] * 50 + [0.0] * 50)
    lo, hi = paired_bootstrap({"t": a}, {"t": b}, {"t": True})["tasks"]["t"]["delta"]
    assert 28.0 < lo < 33.0 and 47.0 < hi < 52.0


def test_rows_must_match():
    with pytest.raises(MultituneError, match="scored 2 and 3 rows"):
        paired_bootstrap({"t": np.ones(2)}, {"t": np.ones(3)}, {"t": True})


def _run(acc: dict[str, float], rows: dict[str, list[int]]) -> dict:
    return {"tasks": {t: {"accuracy": v, "n": len(rows[t])} for t, v in acc.items()}, "rows": rows}


def test_compare_seeds_by_hand():
    metric, higher = {"a": "accuracy", "b": "accuracy"}, {"a": True, "b": True}
    multi = [
        _run({"a": 90.0, "b": 50.0}, {"a": [100] * 9 + [0], "b": [100, 0]}),
        _run({"a": 80.0, "b": 100.0}, {"a": [100] * 8 + [0] * 2, "b": [100, 100]}),
    ]
    single = {
        "a": [_run({"a": 80.0}, {"a": [100] * 8 + [0] * 2}), _run({"a": 80.0}, {"a": [100] * 8 + [0] * 2})],
        "b": [_run({"b": 50.0}, {"b": [0, 100]}), _run({"b": 100.0}, {"b": [100, 100]})],
    }
    out = compare_seeds(multi, single, metric, higher)
    # seed 0: a +12.5%, b 0% -> Δm 6.25; seed 1: a 0%, b 0% -> Δm 0
    assert [p["delta_m"] for p in out["per_seed"]] == [6.25, 0.0]
    assert out["delta_m"] == 3.125 and out["delta_m_std"] == pytest.approx(6.25 / 2**0.5)
    assert out["tasks"]["a"]["multi"] == 85.0 and out["tasks"]["a"]["multi_std"] == pytest.approx(50**0.5)
    assert out["tasks"]["a"]["single"] == 80.0 and out["tasks"]["a"]["single_std"] == 0.0
    assert out["tasks"]["a"]["relative_delta"] == 6.25 and out["tasks"]["a"]["delta"] == 5.0
    assert out["below_baseline"] == 0 and out["worst_task"] == "b"
    # seed-averaged rows of b: multi (100, 50), single (50, 100); the intervals exist and contain the means
    lo, hi = out["tasks"]["a"]["interval"]
    assert lo <= 5.0 <= hi
    assert "delta_m_interval" in out and 0.0 <= out["p_better"] <= 1.0


def test_compare_with_seeds_end_to_end(run_config, tmp_path, capsys):
    raw = run_config(tasks=[task_sst2(), task_rte()], mixing={"strategy": "uniform"}, train={"max_steps": 2})
    cfg = write_yaml(tmp_path / "run.yaml", raw)
    assert main(["compare", str(cfg), "--seeds", "0", "1"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "compare.json").read_text())
    assert summary["seeds"] == [0, 1]
    runs = [json.loads((tmp_path / "run" / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    for s in (0, 1):
        saved = (tmp_path / "run-single" / "sst2" / f"seed-{s}" / "config.yaml").read_text()
        assert f"seed: {s}" in saved
    accs = [r["fine_tuned"]["tasks"]["sst2"]["accuracy"] for r in runs]
    assert summary["tasks"]["sst2"]["multi"] == pytest.approx(sum(accs) / 2)
    assert summary["tasks"]["sst2"]["multi_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    assert len(summary["per_seed"]) == 2 and len(summary["delta_m_interval"]) == 2
    assert "over 2 seeds (mean ± std)" in out and "95% interval" in out
    assert out.rstrip().endswith((tmp_path / "run" / "compare.md").read_text().strip())
    # a second call reuses all six runs
    assert main(["compare", str(cfg), "--seeds", "0", "1", "--resume"]) == 0
    assert capsys.readouterr().out.count(" reusing ") == 6
    assert main(["compare", str(cfg), "--seeds", "0", "0"]) == 2
    assert main(["compare", str(cfg), "--seeds", "-1"]) == 2
    assert "--seeds must be integers from 0 to 2**32 - 1: [-1]" in capsys.readouterr().err
