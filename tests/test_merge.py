"""`multitune merge` and `compare --merge`: single-task LoRA runs combined into one adapter with
PEFT's add_weighted_adapter, written as a run, evaluated on every task. Tiny models only."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import task_rte, task_sst2, write_yaml

from multitune import rundir
from multitune.cli import main
from multitune.merging import MERGE_METHODS
from multitune.methods.lora.export import lora_factors
from multitune.models.load import load_trained_model

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def singles(tmp_path_factory, tiny_model_dir):
    """Finished single-task LoRA runs: sst2 and rte of rank 4, and another rte run of rank 2."""
    root = tmp_path_factory.mktemp("singles")
    runs = {}
    for name, task, rank in (("sst2", task_sst2(), 4), ("rte", task_rte(), 4), ("rte-r2", task_rte(), 2)):
        raw = {
            "model": str(tiny_model_dir),
            "method": {"name": "lora", "rank": rank, "alpha": 8, "dropout": 0.0},
            "tasks": [task],
            "train": {"max_steps": 3, "batch_size": 4, "lr": 2e-2, "max_length": 96, "seed": 0},
            "eval": {"max_new_tokens": 6, "batch_size": 8, "zero_shot": False},
            "output": str(root / name),
        }
        assert main(["train", str(write_yaml(root / f"{name}.yaml", raw))]) == 0
        runs[name] = root / name
    return runs


def _deltas(run) -> dict[str, torch.Tensor]:
    model, _ = load_trained_model(run, rundir.load_run_config(run))
    return {name: s * (b @ a) for name, (a, b, s) in lora_factors(model).items()}


def test_cat_merge_is_the_exact_weighted_sum_and_a_run_of_its_own(singles, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["merge", str(singles["sst2"]), str(singles["rte"]), "--output", str(out), "--weights", "1.0", "0.5"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| sst2 | accuracy |" in text and "| rte | accuracy |" in text and "cat merge of 2 runs, rank 8" in text
    merged, sst2, rte = _deltas(out), _deltas(singles["sst2"]), _deltas(singles["rte"])
    assert set(merged) == set(sst2) and len(merged) > 4
    for name, delta in merged.items():
        assert (delta - (sst2[name] + 0.5 * rte[name])).abs().max() < 1e-6, name
    cfg = rundir.load_run_config(out)
    assert cfg.task_names == ["sst2", "rte"] and cfg.method.rank == 8
    results = json.loads((out / "results.json").read_text())
    sources = {
        t: json.loads((singles[t] / "results.json").read_text())["fine_tuned"]["tasks"][t] for t in ("sst2", "rte")
    }
    assert results["merge"]["source_scores"] == sources and results["merge"]["weights"] == [1.0, 0.5]
    assert {t: m["n"] for t, m in results["fine_tuned"]["tasks"].items()} == {t: s["n"] for t, s in sources.items()}
    assert (out / ".multitune-run").is_file()
    card = (out / "model" / "README.md").read_text()
    assert "## Made by merging" in card and f"multitune merge {singles['sst2']} {singles['rte']}" in card
    assert "--method cat --weights 1 0.5" in card
    assert main(["report", str(out)]) == 0 and (out / "report.html").stat().st_size > 1000
    # a merged run is an ordinary LoRA run: eval and export work on it
    assert main(["eval", str(out)]) == 0
    assert main(["export", str(out), "--format", "peft-lora"]) == 0
    assert json.loads((out / "export/lora-peft-lora/adapter_config.json").read_text())["r"] == 8


def test_svd_at_full_rank_equals_the_sum_and_lower_ranks_truncate(singles, tmp_path):
    exact = {
        n: d + e for (n, d), e in zip(_deltas(singles["sst2"]).items(), _deltas(singles["rte"]).values(), strict=True)
    }
    for rank in (8, 2):
        out = tmp_path / f"svd{rank}"
        assert (
            main(
                [
                    "merge",
                    str(singles["sst2"]),
                    str(singles["rte"]),
                    "--output",
                    str(out),
                    "--method",
                    "svd",
                    "--rank",
                    str(rank),
                ]
            )
            == 0
        )
        merged = _deltas(out)
        worst = max(float((merged[n] - exact[n]).abs().max() / exact[n].abs().max()) for n in exact)
        if rank == 8:
            assert worst < 1e-4
        else:  # rank 2 of a rank-8 sum: close, not equal, and the best rank-2 approximation of each layer
            assert worst > 1e-4
            name = next(iter(exact))
            s = torch.linalg.svdvals(exact[name].double())
            err = float(torch.linalg.matrix_norm((merged[name] - exact[name]).double()))
            assert err == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-3)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_factor_merges_run_and_evaluate(singles, tmp_path, method):
    out = tmp_path / method
    assert main(["merge", str(singles["sst2"]), str(singles["rte"]), "--output", str(out), "--method", method]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["merge"]["method"] == method and set(results["fine_tuned"]["tasks"]) == {"sst2", "rte"}
    assert results["merge"]["density"] == (0.5 if method != "linear" else None) and results["merge"]["rank"] == 4


def test_merge_refuses_bad_input_in_one_line(singles, tmp_path, capsys, run_config):
    a, b, r2 = (str(singles[k]) for k in ("sst2", "rte", "rte-r2"))
    moe = tmp_path / "moe"
    raw = run_config(method={"name": "moe_lora", "rank": 4, "experts": 2}, train={"max_steps": 1}, output=str(moe))
    assert main(["train", str(write_yaml(tmp_path / "moe.yaml", raw))]) == 0
    out = str(tmp_path / "m")
    cases = [
        ([a, "--output", out], "merge needs at least two runs"),
        ([a, b, "--output", out, "--weights", "1"], "--weights gives 1 numbers for 2 runs"),
        ([a, b, "--output", out, "--weights", "1", "nan"], "--weights must be finite numbers"),
        ([a, b, "--output", out, "--method", "mean"], "unknown merge method 'mean'; choose one of: cat, svd"),
        ([a, b, "--output", out, "--density", "0.3"], "--density is for ties, dare_ties, dare_linear, magnitude_prune"),
        ([a, b, "--output", out, "--method", "ties", "--density", "1.5"], "--density must be in (0, 1]"),
        ([a, b, "--output", out, "--rank", "2"], "--rank is for svd, not cat"),
        ([b, r2, "--output", out], "task 'rte' is in more than one of the runs"),
        ([a, str(moe), "--output", out], "a 'moe_lora' run; merge combines LoRA runs"),
        ([a, str(tmp_path / "nope"), "--output", out], "is not a run directory"),
        ([a, b, "--output", a], "is not empty: pass --overwrite"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["merge", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    assert not (tmp_path / "m").exists()  # nothing written by a refused merge
    # combining factors entry by entry needs one rank (sst2 has rank 4, the other rte run rank 2); cat does not
    assert main(["merge", a, r2, "--output", out, "--method", "linear"]) == 2
    assert "linear combines the factors entry by entry and needs one rank; got [4, 2]: use cat or svd" in (
        capsys.readouterr().err
    )
    assert main(["merge", a, r2, "--output", out]) == 0
    assert rundir.load_run_config(out).method.rank == 6


def test_help_names_every_merge_method(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(m in help_text for m in MERGE_METHODS)


def test_compare_merge_adds_the_merged_model_beside_joint_training(run_config, tmp_path, capsys):
    raw = run_config(tasks=[task_sst2(), task_rte()], mixing={"strategy": "uniform"}, train={"max_steps": 4})
    cfg = write_yaml(tmp_path / "run.yaml", raw)
    assert main(["compare", str(cfg), "--merge", "cat"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "compare.json").read_text())
    merged = json.loads((tmp_path / "run-merged-cat" / "results.json").read_text())
    assert merged["merge"]["runs"] == [str(tmp_path / "run-single" / t) for t in ("sst2", "rte")]
    singles = {t: summary["tasks"][t]["single"] for t in ("sst2", "rte")}
    rel = {t: 100 * (merged["fine_tuned"]["tasks"][t]["accuracy"] - s) / s for t, s in singles.items()}
    assert summary["merged"]["method"] == "cat"
    assert summary["merged"]["delta_m"] == pytest.approx(sum(rel.values()) / 2)
    assert "Merged single-task LoRAs (cat" in out and "| task | metric | single-task | merged LoRAs |" in out
    assert f"Δm {summary['merged']['delta_m']:+.2f}% (cat merge)" in out
    # the report sets both tables out as tables, the summary lines as text
    assert main(["report", str(tmp_path / "run")]) == 0
    page = (tmp_path / "run" / "report.html").read_text()
    section = page.split("<h2>Single-task vs multi-task</h2>")[1].split("<h2>")[0]
    assert section.count("<table>") == 2 and "<pre>" not in section and "|" not in section
    assert "<th>merged LoRAs</th>" in section and "<p>Merged single-task LoRAs (cat" in section
    assert f"<td>{summary['tasks']['rte']['single']:.2f}</td>" in section
    # reused on a second call, not merged again
    assert main(["compare", str(cfg), "--merge", "cat", "--reuse"]) == 0
    assert f"[compare] 4/4 reusing {tmp_path / 'run-merged-cat'}" in capsys.readouterr().out
    capsys.readouterr()
    bad = run_config(method={"name": "moe_lora", "rank": 4, "experts": 2})
    assert main(["compare", str(write_yaml(tmp_path / "moe.yaml", bad)), "--merge", "cat"]) == 2
    assert "--merge combines single-task LoRA runs; this run's method is moe_lora" in capsys.readouterr().err
    # the merge's own comparison beside it; other weights and densities get folders of their own
    assert json.loads((tmp_path / "run-merged-cat" / "compare.json").read_text()) == summary["merged"]
    assert main(["compare", str(cfg), "--reuse", "--merge", "linear", "--merge-weight", "0.5"]) == 0
    assert main(["compare", str(cfg), "--reuse", "--merge", "ties", "--merge-density", "0.3"]) == 0
    linear = json.loads((tmp_path / "run-merged-linear-w0.5" / "results.json").read_text())["merge"]
    ties = json.loads((tmp_path / "run-merged-ties-d0.3" / "results.json").read_text())["merge"]
    assert (linear["method"], linear["weights"], linear["density"]) == ("linear", [0.5, 0.5], None)
    assert (ties["method"], ties["weights"], ties["density"]) == ("ties", [1.0, 1.0], 0.3)
    beside = json.loads((tmp_path / "run-merged-ties-d0.3" / "compare.json").read_text())
    assert (beside["method"], beside["weight"], beside["density"]) == ("ties", 1.0, 0.3)
    assert json.loads((tmp_path / "run-merged-cat" / "compare.json").read_text()) == summary["merged"]  # kept
    capsys.readouterr()
    assert main(["compare", str(cfg), "--merge-weight", "0.5"]) == 2
    assert "--merge-weight and --merge-density go with --merge METHOD" in capsys.readouterr().err
    assert main(["compare", str(cfg), "--merge", "cat", "--merge-density", "0.3"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "multitune: error: --density is for ties, dare_ties, dare_linear, magnitude_prune, not cat"
    )
