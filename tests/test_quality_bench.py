"""bench/quality.py's own logic (the study's runs themselves are not retrained in tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import load_bench

from multitune.config.load import load_config

ROOT = Path(__file__).resolve().parents[1]


def _quality():
    return load_bench("quality")


def test_the_study_seed_is_the_one_of_study_yaml():
    q = _quality()
    assert q.STUDY_SEED == yaml.safe_load(q.STUDY.read_text())["train"]["seed"]


def test_every_variant_is_a_valid_config_of_the_study(tmp_path):
    q = _quality()
    methods = {v: load_config(q.STUDY, [*q.data_overrides(str(tmp_path)), *o]).method for v, o in q.VARIANTS.items()}
    assert (methods["adapter"].name, methods["adapter"].bottleneck) == ("adapter", 141)
    assert (methods["lora-r64"].rank, methods["cgc-count"].gate_norm, methods["famo"].rank) == (64, "count", 16)


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


def _fine_tuned(rows: float, n: int = 4) -> dict:
    """A collected results.json whose every task scored `rows` (0 or 100) on each of n dev rows."""
    q = _quality()
    return {"fine_tuned": {"tasks": {t: {"accuracy": rows} for t in q.TASKS}, "rows": {t: [rows] * n for t in q.TASKS}}}


def test_versus_over_seeds_averages_each_row_over_the_seeds(tmp_path, monkeypatch, capsys):
    q = _quality()
    monkeypatch.setattr(q, "RESULTS", tmp_path)
    for name, scores in (("a", (100.0, 100.0)), ("b", (0.0, 100.0))):
        for seed, score in zip((0, 1), scores, strict=True):
            (tmp_path / name / f"seed-{seed}").mkdir(parents=True)
            (tmp_path / name / f"seed-{seed}" / "results.json").write_text(json.dumps(_fine_tuned(score)))
    q.versus(type("Args", (), {"a": "a", "b": "b", "seeds": [0, 1]}))
    out = capsys.readouterr().out
    # b's rows average to 50 over its two seeds, a's to 100: every resample's Δ is +50, Δm +100%
    assert "| sst2 | 100.00 ± 0.00 | 50.00 ± 70.71 | +50.00 [+50.00, +50.00] |" in out
    assert "| a (mean ± std over seeds 0 1) | b |" in out
    assert "95% interval [+100.00, +100.00]%, a better in 100% of resamples" in out
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"a/seed-2/results.json not found: train and collect a --seeds 0 2 first"):
        q.versus(type("Args", (), {"a": "a", "b": "b", "seeds": [0, 2]}))


def test_versus_compares_two_single_task_runs_on_their_task(tmp_path, monkeypatch, capsys):
    q = _quality()
    monkeypatch.setattr(q, "RESULTS", tmp_path)
    for name, rows in (("x/rte", [100.0, 100.0, 0.0, 0.0]), ("y/rte", [0.0, 100.0, 0.0, 0.0]), ("z/sst2", [0.0] * 4)):
        results = {"fine_tuned": {"tasks": {name[2:]: {"accuracy": sum(rows) / 4}}, "rows": {name[2:]: rows}}}
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    q.versus(type("Args", (), {"a": "x/rte", "b": "y/rte", "seeds": None}))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in lines if line.startswith("| ") and "---" not in line] == ["| task", "| rte"]
    assert lines[2].startswith("| rte | 50.00 | 25.00 | +25.00 [")
    with pytest.raises(SystemExit, match=r"x/rte and z/sst2 have no task in common"):
        q.versus(type("Args", (), {"a": "x/rte", "b": "z/sst2", "seeds": None}))


def test_table_shows_mean_and_std_over_seeds_and_the_singles_of_those_seeds(tmp_path, monkeypatch, capsys):
    q = _quality()
    monkeypatch.setattr(q, "RESULTS", tmp_path)
    tasks = {t: {"single": 80.0, "single_std": 1.0, "multi": 82.0, "multi_std": 0.5} for t in q.TASKS}
    compare = {"seeds": [0, 1, 2], "tasks": tasks, "delta_m": 2.5, "delta_m_std": 0.25, "delta_m_interval": [1.0, 4.0]}
    for name in ("lora-r16", "cgc-count"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "compare.json").write_text(json.dumps(compare))
    q.table(None)
    lines = capsys.readouterr().out.splitlines()
    singles = "| one LoRA per task (r16 each) | 3 | " + "80.0 ± 1.0 | " * 4 + "80.0 | 0 | |"
    assert lines.count(singles) == 1
    row = "| 3 | 82.0 ± 0.5 | 82.0 ± 0.5 | 82.0 ± 0.5 | 82.0 ± 0.5 | 82.0 | +2.50% ± 0.25 [+1.00, +4.00] |  |"
    assert f"| cgc-count {row}" in lines and f"| lora-r16 {row}" in lines


def test_table_shows_each_set_of_singles_above_the_variants_compared_with_it(tmp_path, monkeypatch, capsys):
    q = _quality()
    monkeypatch.setattr(q, "RESULTS", tmp_path)
    for name, singles, single in (("a", None, 80.0), ("b", "STUDY/single-r16-lr1e-3", 81.0), ("c", None, 80.0)):
        tasks = {t: {"single": single, "single_std": 0.0, "multi": 82.0} for t in q.TASKS}
        compare = {"seeds": [0], "tasks": tasks, "delta_m": 1.0, "delta_m_interval": [0.5, 1.5]}
        if singles:
            compare["singles"] = singles
        (tmp_path / name).mkdir()
        (tmp_path / name / "compare.json").write_text(json.dumps(compare))
        # b was trained with `--seeds 0`: its one run is b/seed-0
        run = tmp_path / name / "seed-0" if name == "b" else tmp_path / name
        run.mkdir(exist_ok=True)
        (run / "results.json").write_text(json.dumps({"train": {"seconds": 60 + ord(name)}, "fine_tuned": name}))
    q.table(None)
    lines = capsys.readouterr().out.splitlines()[2:]
    rows = [line.split(" |")[0] for line in lines]
    assert rows == [
        "| one LoRA per task (r16 each)",
        "| a",
        "| c",
        "| one LoRA per task (r16 each, single-r16-lr1e-3)",
        "| b",
    ]
    assert [line.split("| ")[-1] for line in lines] == ["|", "157 |", "159 |", "|", "158 |"]
    assert q._fine_tuned_runs("b", None) == ["b"] and q._fine_tuned_runs("a", None) == ["a"]


def test_plot_draws_each_comparison_with_its_intervals_grouped_as_in_the_table(tmp_path, monkeypatch, capsys):
    q = _quality()
    monkeypatch.setattr(q, "RESULTS", tmp_path)
    runs = (("a", None, [0]), ("b", "STUDY/single-lr", [0]), ("c", None, [0, 1, 2]))
    for i, (name, singles, seeds) in enumerate(runs):
        tasks = {t: {"delta": i + k, "interval": [i + k - 1.0, i + k + 0.5]} for k, t in enumerate(q.TASKS)}
        compare = {"seeds": seeds, "tasks": tasks, "delta_m": -i, "delta_m_interval": [-i - 2.0, -i + 1.0]}
        if singles:
            compare["singles"] = singles
        (tmp_path / name).mkdir()
        (tmp_path / name / "compare.json").write_text(json.dumps(compare))
    labels, panels = q.plot_points()
    assert labels == ["a", "b (vs single-lr)", "c, 3 seeds"]
    assert list(panels) == [*q.TASKS, "Δm"]
    assert panels["rte"] == [(2, 1.0, 2.5), (3, 2.0, 3.5), (4, 3.0, 4.5)]  # rte is the third task: k = 2
    assert panels["Δm"] == [(0, -2.0, 1.0), (-1, -3.0, 0.0), (-2, -4.0, -1.0)]
    out = tmp_path / "study.png"
    q.plot(type("Args", (), {"out": str(out)}))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"wrote {out} (3 comparisons)\n"
    for folder in ("a", "b", "c"):
        (tmp_path / folder / "compare.json").unlink()
    with pytest.raises(SystemExit, match="no compare.json under"):
        q.plot(type("Args", (), {"out": str(out)}))


def _collect_runs(results: Path, *runs: str) -> None:
    """Collected runs as `collect` leaves them: results (their text the run's name) and a config
    naming STUDY and DATA."""
    for run in runs:
        (results / run).mkdir(parents=True)
        for name in ("results.json", "results.md"):
            (results / run / name).write_text(run)
        (results / run / "config.yaml").write_text(f"output: STUDY/{run}\ndata: DATA/x.jsonl\n")


def test_restore_puts_back_every_collected_set_of_singles(tmp_path, monkeypatch):
    q = _quality()
    results = tmp_path / "results"
    monkeypatch.setattr(q, "RESULTS", results)
    _collect_runs(results, "single-r16/sst2", "single-r16/sst2/seed-1", "single-r16-lr1e-3/rte", "lora-r16")
    runs = tmp_path / "study"
    q.restore(type("Args", (), {"runs": str(runs), "data": "/d", "variants": []}))
    restored = sorted(str(p.parent.relative_to(runs)) for p in runs.rglob("results.json"))
    assert restored == ["single-r16-lr1e-3/rte", "single-r16/sst2", "single-r16/sst2/seed-1"]
    config = (runs / "single-r16-lr1e-3" / "rte" / "config.yaml").read_text()
    assert config == f"output: {runs.resolve()}/single-r16-lr1e-3/rte\ndata: /d/x.jsonl\n"


def test_restore_puts_back_the_runs_of_the_variants_named(tmp_path, monkeypatch):
    """`restore VARIANT`: that variant's collected runs too (every seed), so `train --seeds` on another
    machine reuses them; a variant with nothing collected is one clear line."""
    q = _quality()
    results = tmp_path / "results"
    monkeypatch.setattr(q, "RESULTS", results)
    _collect_runs(results, "single-r16/rte", "cgc-count-lr1e-3/seed-0", "cgc-count-lr1e-3/seed-1", "lora-r16")
    runs = tmp_path / "study"
    q.restore(type("Args", (), {"runs": str(runs), "data": "/d", "variants": ["cgc-count-lr1e-3"]}))
    restored = sorted(str(p.parent.relative_to(runs)) for p in runs.rglob("results.json"))
    assert restored == ["cgc-count-lr1e-3/seed-0", "cgc-count-lr1e-3/seed-1", "single-r16/rte"]
    assert (runs / "cgc-count-lr1e-3" / "seed-1" / "results.json").read_text() == "cgc-count-lr1e-3/seed-1"
    config = (runs / "cgc-count-lr1e-3" / "seed-0" / "config.yaml").read_text()
    assert config == f"output: {runs.resolve()}/cgc-count-lr1e-3/seed-0\ndata: /d/x.jsonl\n"
    with pytest.raises(SystemExit, match=r"moe-count holds no collected run: train and collect moe-count first"):
        q.restore(type("Args", (), {"runs": str(runs), "data": "/d", "variants": ["moe-count"]}))
    (results / "zero-shot").mkdir()
    (results / "zero-shot" / "results.json").write_text("{}")  # no config.yaml beside it: no run to put back
    with pytest.raises(SystemExit, match=r"zero-shot holds no collected run"):
        q.restore(type("Args", (), {"runs": str(runs), "data": "/d", "variants": ["zero-shot"]}))


def test_cgc_affinity_is_cgc_count_with_the_collected_clusters(tmp_path, monkeypatch):
    from multitune.config import load_config

    q = _quality()
    monkeypatch.setattr(q, "RESULTS", tmp_path)
    with pytest.raises(SystemExit, match=r"affinity/clusters.json not found: run `affinity` and `collect` first"):
        q.variant_overrides("cgc-affinity")
    (tmp_path / "affinity").mkdir()
    clusters = {"sst2": "c1", "ag_news": "c2", "rte": "c2", "medical_abstracts": "c1"}
    (tmp_path / "affinity" / "clusters.json").write_text(json.dumps(clusters))
    cfg = load_config(q.STUDY, q.variant_overrides("cgc-affinity"))
    assert cfg.method.name == "cgc_lora" and cfg.method.gate_norm == "count" and cfg.method.common_experts == 2
    assert {t.name: t.cluster for t in cfg.tasks} == clusters
    assert q.variant_overrides("lora-r64") == ["method.rank=64", "method.alpha=128"]


def test_affinity_keeps_two_clusters_that_collect_and_cgc_affinity_use(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The study's affinity step end to end, on the tiny model and the examples' subsets of the
    study's four tasks: clusters.json in STUDY/affinity, collected, read by cgc-affinity."""
    q = _quality()
    study = yaml.safe_load(q.STUDY.read_text())
    study["model"] = str(tiny_model_dir)
    study["train"].update(batch_size=4, max_length=96, save_every=None)
    tiny = tmp_path / "study.yaml"
    tiny.write_text(yaml.safe_dump(study))
    monkeypatch.setattr(q, "STUDY", tiny)
    monkeypatch.setattr(q, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(q, "AFFINITY_STEPS", 2)
    monkeypatch.setattr(q, "AFFINITY_EVERY", 1)
    args = type("Args", (), {"data": str(ROOT / "examples" / "data"), "runs": str(tmp_path / "runs"), "threads": 1})
    q.affinity(args)
    clusters = json.loads((tmp_path / "runs" / "affinity" / "clusters.json").read_text())
    assert set(clusters) == set(q.TASKS) and set(clusters.values()) == {"c1", "c2"}
    assert "proposed 2 clusters" in capsys.readouterr().out
    q.collect(type("Args", (), {"runs": str(tmp_path / "runs"), "data": args.data}))
    assert json.loads((tmp_path / "results" / "affinity" / "clusters.json").read_text()) == clusters
    assert "heatmap: STUDY/affinity/affinity.png" in (tmp_path / "results" / "affinity" / "affinity.md").read_text()
    overrides = q.variant_overrides("cgc-affinity")
    assert [o for o in overrides if ".cluster=" in o] == [f"tasks.{t}.cluster={c}" for t, c in clusters.items()]


def test_collect_names_this_machines_folders_by_role(tmp_path, monkeypatch):
    q = _quality()
    monkeypatch.setattr(q, "RESULTS", tmp_path / "results")
    runs, data = tmp_path / "study", tmp_path / "data"
    run = runs / "lora-r16-merged-cat"
    run.mkdir(parents=True)
    results = {"fine_tuned": {"tasks": {}}, "merged_from": [str(runs / "single-r16" / "sst2")]}
    (run / "results.json").write_text(json.dumps(results))
    (run / "results.md").write_text(f"from {runs}/single-r16\n")
    (run / "config.yaml").write_text(f"output: {run}\ndata: {data}/sst2/train.jsonl\n")
    q.collect(type("Args", (), {"runs": str(runs), "data": str(data)}))
    got = tmp_path / "results" / "lora-r16-merged-cat"
    assert json.loads((got / "results.json").read_text())["merged_from"] == ["STUDY/single-r16/sst2"]
    assert (got / "results.md").read_text() == "from STUDY/single-r16\n"
    assert (got / "config.yaml").read_text() == "output: STUDY/lora-r16-merged-cat\ndata: DATA/sst2/train.jsonl\n"


def test_bad_input_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    """A wrong override (or a run dir in use by another process) stops `train` with one line."""
    q = _quality()
    argv = ["quality.py", "--data", str(tmp_path), "--runs", str(tmp_path / "study"), "train", "lora-r16"]
    monkeypatch.setattr("sys.argv", [*argv, "--set", "train.lr=fast"])
    with pytest.raises(SystemExit) as stop:
        q.main()
    message = str(stop.value.code)
    assert message.startswith("quality: ") and "train.lr" in message and "\n" not in message
    assert not (tmp_path / "study").exists()
