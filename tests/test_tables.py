"""The results table: n per task, a 95% interval for every share of rows, Δ between columns."""

import pytest

from multitune.config import validate_config
from multitune.reporting.tables import results_rows, results_table, wilson_interval

PT = {"prompt": "{{ text }}", "target": "{{ label }}"}


def test_wilson_interval_textbook_values():
    assert wilson_interval(0.5, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    lo, hi = wilson_interval(1.0, 10)
    assert lo == pytest.approx(0.72247, abs=1e-5) and hi == pytest.approx(1.0)


def test_table_shows_n_and_intervals_and_the_delta():
    cfg = validate_config(
        {
            "tasks": [
                {"name": "sst2", "kind": "classification", "data": {"train": "x"}, "labels": ["a", "b"], **PT},
                {"name": "tldr", "kind": "generation", "data": {"train": "x"}, "metric": "rouge_l", **PT},
            ]
        }
    )
    results = {
        "zero_shot": {"tasks": {"sst2": {"accuracy": 50.0, "n": 100}, "tldr": {"rouge_l": 20.0, "n": 8}}, "mean": 35.0},
        "fine_tuned": {
            "tasks": {"sst2": {"accuracy": 88.0, "n": 100}, "tldr": {"rouge_l": 31.5, "n": 8}},
            "mean": 59.75,
        },
    }
    header, rows = results_rows(results, cfg)
    assert header == ["task", "metric", "n", "zero-shot", "fine-tuned", "Δ"]
    assert rows[0] == ["sst2", "accuracy", "100", "50.0 [40.4, 59.6]", "88.0 [80.2, 93.0]", "+38.0"]
    assert rows[1] == ["tldr", "rouge_l", "8", "20.0", "31.5", "+11.5"]  # not a share of rows: no interval
    assert rows[-1] == ["**mean**", "primary", "", "35.0", "59.8", "+24.8"]
    assert "| sst2 | accuracy | 100 | 50.0 [40.4, 59.6] |" in results_table(results, cfg)


def test_columns_scored_on_different_rows_show_both_counts():
    cfg = validate_config(
        {"tasks": [{"name": "sst2", "kind": "classification", "data": {"train": "x"}, "labels": ["a"], **PT}]}
    )
    results = {
        "zero_shot": {"tasks": {"sst2": {"accuracy": 50.0, "n": 150}}},
        "fine_tuned": {"tasks": {"sst2": {"accuracy": 80.0, "n": 5}}},
    }
    assert results_rows(results, cfg)[1][0][2] == "150 / 5"
