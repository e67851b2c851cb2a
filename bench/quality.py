"""The quality study (docs/results.md): every method on the same four tasks and budget, against one
LoRA per task, with the whole dev split of every task.

    python bench/quality.py --data DIR --runs STUDY train lora-r16            # singles + multi-task, seed 0
    python bench/quality.py --data DIR --runs STUDY train cgc-count --seeds 0 1 2
    python bench/quality.py --data DIR --runs STUDY train lora-r16 --merge cat  # + the singles merged
    python bench/quality.py --data DIR --runs STUDY train lora-r16 --name lora-r16-lr1e-3 \
        --set train.lr=1e-3 --singles single-r16-lr1e-3                       # baselines at that lr too
    python bench/quality.py --data DIR --runs STUDY zero-shot                # the base model, whole dev splits
    python bench/quality.py --data DIR --runs STUDY affinity                 # clusters for train cgc-affinity
    python bench/quality.py --data DIR --runs STUDY collect                  # small outputs -> docs/results/
    python bench/quality.py --data DIR --runs STUDY restore                  # docs/results/ -> STUDY (reuse)
    python bench/quality.py --data DIR --runs STUDY restore cgc-count-lr1e-3 # + that variant's runs
    python bench/quality.py table                                            # docs/results -> markdown tables
    python bench/quality.py plot                                             # docs/results -> docs/results/study.png
    python bench/quality.py versus cgc-count lora-r16                        # two variants, paired over dev rows
    python bench/quality.py versus cgc-count lora-r16 --seeds 0 1 2          # the same over their seeds' runs

`train` runs `multitune compare` on bench/quality/study.yaml with the variant's overrides, the
single-task baselines shared by every variant in STUDY/single-r16 (or `--singles NAME`: baselines
trained with the same `--set`, e.g. a learning rate, in STUDY/NAME), and --resume: a stopped study
continues where it stopped (each run checkpoints every 25 steps); compare names the settings a
reused baseline was trained with where they differ from the variant's. `collect` copies each finished
run's config.yaml and results.json, and each variant's compare.json / compare.md, into
docs/results/, so nothing has to be trained twice; `restore` puts the collected single-task
results back under a new STUDY folder (compare reuses a run whose results.json is finished, so the
baselines are not trained again on another machine; `restore VARIANT ...` also puts back those
variants' collected runs, so `--seeds` adds a seed without training the others again); `table`
rebuilds the tables from there.
`--merge` needs the single-task runs' weights, which restored results do not have: train them.
`affinity` measures the lookahead task affinity (`multitune affinity`) on the study's rows and
writes the proposed clusters to STUDY/affinity/clusters.json; `collect` keeps them, and
`train cgc-affinity` is cgc-count with those clusters. With `--seeds`, each seed's runs go to
RUN/seed-<s>; the seed-0 runs trained before without `--seeds` (in RUN itself) are copied there and
reused, not trained again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from multitune.errors import MultituneError
from multitune.files import atomic_path, write_atomic

HERE = Path(__file__).resolve().parent
STUDY = HERE / "quality" / "study.yaml"
RESULTS = HERE.parent / "docs" / "results"
TASKS = ("sst2", "ag_news", "rte", "medical_abstracts")
SINGLES = "single-r16"
STUDY_SEED = 0  # train.seed of study.yaml (tests/test_study.py checks it)

# name -> overrides of study.yaml (LoRA rank 16, alpha 32, lr 5e-4 unless set here)
VARIANTS = {
    "lora-r16": [],
    "lora-r64": ["method.rank=64", "method.alpha=128"],
    "moe-softmax": ["method.name=moe_lora", "method.experts=4"],
    "moe-count": ["method.name=moe_lora", "method.experts=4", "method.gate_norm=count"],
    "cgc-softmax": ["method.name=cgc_lora", "method.common_experts=2", "method.task_experts=1"],
    "cgc-count": ["method.name=cgc_lora", "method.common_experts=2", "method.task_experts=1", "method.gate_norm=count"],
    "famo": ["train.balance=famo"],
    "pcgrad": ["train.balance=pcgrad"],
    "imtl_g": ["train.balance=imtl_g"],
    # bottleneck 141 after each MLP: 4,894,470 trainable parameters, LoRA r16's 4,884,480 + 0.2%
    # (the whole method block replaced: study.yaml's LoRA keys rank / alpha / targets are no adapter's)
    "adapter": ["method={name: adapter, bottleneck: 141}"],
    "lora-experts-A": ["method.name=lora_experts", "method.share=A", "method.experts=4"],
    "lora-experts-B": ["method.name=lora_experts", "method.share=B", "method.experts=4"],
    "mtl-lora": ["method.name=mtl_lora", "method.rank=8", "method.alpha=16", "method.up_projections=3"],
}
AFFINITY_VARIANT = "cgc-affinity"  # cgc-count with the clusters `affinity` proposed (collected)
AFFINITY_STEPS, AFFINITY_EVERY = 40, 2  # lookahead affinity measured every 2nd of the first 40 steps (320 rows)


def variant_overrides(variant: str) -> list[str]:
    """The overrides of study.yaml that make a variant; cgc-affinity adds the measured clusters."""
    if variant != AFFINITY_VARIANT:
        return list(VARIANTS[variant])
    path = RESULTS / "affinity" / "clusters.json"
    if not path.is_file():
        sys.exit(f"{path} not found: run `affinity` and `collect` first")
    clusters = json.loads(path.read_text())
    return [*VARIANTS["cgc-count"], *(f"tasks.{t}.cluster={c}" for t, c in clusters.items())]


def data_overrides(data: str) -> list[str]:
    return [f"tasks.{t}.data.{s}={Path(data) / t / f'{s}.jsonl'}" for t in TASKS for s in ("train", "dev")]


def _seed_dir_from_before(run: Path, seed: int) -> None:
    """A run trained without --seeds sits in RUN itself; with --seeds, its seed's run is
    RUN/seed-<seed>: the small outputs are copied there, so compare reuses it instead of training
    it again (compare reuses a run whose results.json is finished)."""
    dst = run / f"seed-{seed}"
    results = run / "results.json"
    if (dst / "results.json").exists() or not results.is_file():
        return
    if "fine_tuned" not in json.loads(results.read_text()):
        return
    dst.mkdir()
    for name in ("config.yaml", "results.md", "results.json"):  # results.json last: it marks the run finished
        if (run / name).is_file():
            write_atomic(dst / name, (run / name).read_bytes())
    print(f"reusing {run} as {dst}")


def train_variant(args) -> None:
    from multitune.analysis.experiments import compare_run

    out = Path(args.runs) / (args.name or args.variant)
    overrides = [*data_overrides(args.data), *variant_overrides(args.variant), *args.set, f"output={out}"]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    singles = str(Path(args.runs) / args.singles)
    if args.seeds and STUDY_SEED in args.seeds:
        for run in [out, *(Path(singles) / t for t in TASKS)]:
            _seed_dir_from_before(run, STUDY_SEED)
    merge = {"merge": args.merge, "merge_weight": args.merge_weight, "merge_density": args.merge_density}
    done = compare_run(STUDY, overrides, singles=singles, resume=True, seeds=args.seeds, **merge)
    print(done["text"])


def zero_shot(args) -> None:
    """The base model on the whole dev splits, in STUDY/zero-shot/results.json."""
    import multitune
    from multitune.config import dump_config, load_config

    overrides = data_overrides(args.data) + ([f"train.threads={args.threads}"] if args.threads else [])
    done = multitune.evaluate(STUDY, overrides, base=True)
    out = Path(args.runs) / "zero-shot"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", dump_config(load_config(STUDY, overrides)))
    write_atomic(out / "results.md", done["table"] + "\n")
    write_atomic(out / "results.json", json.dumps({"zero_shot": done["results"]}, indent=1) + "\n")  # last: done
    print(done["table"])


def affinity(args) -> None:
    """Lookahead task affinity (TAG) at every AFFINITY_EVERY-th of the first AFFINITY_STEPS steps of
    the multi-task LoRA on the study's rows, and the 2 clusters it proposes, in STUDY/affinity (clusters.json)."""
    from multitune.analysis.experiments import affinity_run

    overrides = data_overrides(args.data) + ([f"train.threads={args.threads}"] if args.threads else [])
    out = Path(args.runs) / "affinity"
    steps = {"steps": AFFINITY_STEPS, "every": AFFINITY_EVERY}
    done = affinity_run(STUDY, overrides, **steps, clusters=2, output=str(out), overwrite=True)
    write_atomic(out / "clusters.json", json.dumps(done["clusters"], indent=1) + "\n")
    print(done["text"])


def collect(args) -> None:
    """Copy the small outputs of every finished run under --runs into docs/results/, with this
    machine's folders named by role: DATA (--data) and STUDY (--runs)."""
    runs = Path(args.runs)
    roles = [(str(Path(folder).resolve()), role) for folder, role in ((args.data, "DATA"), (runs, "STUDY")) if folder]

    def copy_text(src: Path, dst: Path) -> None:
        text = src.read_text(encoding="utf-8")
        for folder, role in roles:
            text = text.replace(folder, role)
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dst, text)

    for results in sorted(runs.rglob("results.json")):
        done = json.loads(results.read_text())
        if "fine_tuned" not in done and not (results.parent.name == "zero-shot" and "zero_shot" in done):
            continue
        for name in ("config.yaml", "results.md", "results.json"):
            copy_text(results.parent / name, RESULTS / results.parent.relative_to(runs) / name)
    for compare in sorted(runs.rglob("compare.json")):
        for name in ("compare.json", "compare.md"):
            copy_text(compare.parent / name, RESULTS / compare.parent.relative_to(runs) / name)
    if (runs / "affinity" / "clusters.json").is_file():  # `affinity`: no results of its own, its clusters
        copy_text(runs / "affinity" / "clusters.json", RESULTS / "affinity" / "clusters.json")
        if (runs / "affinity" / "affinity.md").is_file():
            copy_text(runs / "affinity" / "affinity.md", RESULTS / "affinity" / "affinity.md")
        if (runs / "affinity" / "affinity.png").is_file():
            write_atomic(RESULTS / "affinity" / "affinity.png", (runs / "affinity" / "affinity.png").read_bytes())
    print(f"copied into {RESULTS}")


def restore(args) -> None:
    """Copy the collected single-task runs (results and config; every docs/results/single-*
    folder), and the runs of the multi-task variants named, back into STUDY, with DATA and STUDY
    replaced by this machine's folders, so `train` reuses them: another machine adds a seed to a
    variant (`train VARIANT --seeds 0 1 2` after `restore VARIANT`) without training the collected
    seeds again."""
    found = []
    for variant in args.variants:
        runs = sorted(r for r in (RESULTS / variant).glob("**/results.json") if (r.parent / "config.yaml").is_file())
        if not runs:
            sys.exit(f"{RESULTS / variant} holds no collected run: train and collect {variant} first")
        found += runs
    for results in sorted(RESULTS.glob("single-*/**/results.json")) + found:
        dst = Path(args.runs) / results.parent.relative_to(RESULTS)
        if (dst / "results.json").exists():
            print(f"kept {dst} (already there)")
            continue
        dst.mkdir(parents=True, exist_ok=True)
        text = (results.parent / "config.yaml").read_text(encoding="utf-8")
        text = text.replace("DATA/", f"{Path(args.data).resolve()}/").replace("STUDY/", f"{Path(args.runs).resolve()}/")
        write_atomic(dst / "config.yaml", text)
        for name in ("results.md", "results.json"):  # results.json last: it marks the run finished
            write_atomic(dst / name, (results.parent / name).read_bytes())
        print(f"restored {dst}")


def _compares() -> list[tuple[str, dict, str, list[int]]]:
    """Every collected compare.json as (variant, compare, singles folder, seeds), grouped by the baselines
    it was compared with (singles folder and seeds, in order of first appearance), so a reader sees
    each variant under its own single-task LoRAs; names sorted within a group."""
    groups: dict[tuple[str, tuple[int, ...]], list[tuple[str, dict, str, list[int]]]] = {}
    for folder in sorted(p for p in RESULTS.iterdir() if (p / "compare.json").is_file()):
        c = json.loads((folder / "compare.json").read_text())
        singles = Path(c.get("singles", SINGLES)).name  # compare.json names its baselines' folder
        seeds = c.get("seeds", [STUDY_SEED])
        groups.setdefault((singles, tuple(seeds)), []).append((folder.name, c, singles, seeds))
    return [row for rows in groups.values() for row in rows]


def table(args) -> None:
    """One row per collected variant: dev accuracy per task, mean, Δm against one LoRA per task."""
    print("| variant | seeds | " + " | ".join(TASKS) + " | mean | Δm vs single-task (95% interval) | train s |")
    print("|---|---|" + "---|" * len(TASKS) + "---|---|---|")
    zero = RESULTS / "zero-shot" / "results.json"
    if zero.is_file():
        z = json.loads(zero.read_text())["zero_shot"]["tasks"]
        cells = " | ".join(f"{z[t]['accuracy']:.1f}" for t in TASKS)
        print(f"| zero-shot | - | {cells} | {sum(z[t]['accuracy'] for t in TASKS) / len(TASKS):.1f} | | |")
    baselines = None
    for variant, c, singles, seeds in _compares():
        n = len(seeds)
        if (singles, seeds) != baselines:  # the single-task LoRAs first, then every variant compared with them
            baselines = (singles, seeds)
            single = [(c["tasks"][t]["single"], c["tasks"][t]["single_std"] if n > 1 else None) for t in TASKS]
            label = "r16 each" + (f", {singles}" if singles != SINGLES else "")
            mean = sum(m for m, _ in single) / len(TASKS)
            print(f"| one LoRA per task ({label}) | {n} | {_cells(single)} | {mean:.1f} | 0 | |")
        accs = [(c["tasks"][t]["multi"], c["tasks"][t].get("multi_std", 0.0) if n > 1 else None) for t in TASKS]
        lo, hi = c.get("delta_m_interval", [float("nan")] * 2)
        if "method" in c:  # the single-task LoRAs merged (compare --merge): no training of its own
            how = f"{c['method']}, weight {c.get('weight', 1.0):g}"
            if c.get("density") is not None:
                how += f", density {c['density']:g}"
            shown, seconds = f"merged single-task LoRAs ({how})", 0
        else:
            shown = variant
            seconds = json.loads(_results_file(variant).read_text())["train"]["seconds"] if n == 1 else ""
        dm = f"{c['delta_m']:+.2f}%" + (f" ± {c['delta_m_std']:.2f}" if n > 1 else "")
        print(
            f"| {shown} | {n} | {_cells(accs)} | {sum(m for m, _ in accs) / len(accs):.1f} | "
            f"{dm} [{lo:+.2f}, {hi:+.2f}] | {seconds} |"
        )


def plot_points() -> tuple[list[str], dict[str, list[tuple[float, float, float]]]]:
    """The forest plot's data: one label per collected comparison (grouped as in `table`) and, per
    panel (each task's accuracy difference in points, then Δm in %), (value, low, high) of each."""
    labels, panels = [], {t: [] for t in (*TASKS, "Δm")}
    for variant, c, singles, seeds in _compares():
        n = len(seeds)
        labels.append(variant + (f", {n} seeds" if n > 1 else "") + (f" (vs {singles})" if singles != SINGLES else ""))
        for t in TASKS:
            panels[t].append((c["tasks"][t]["delta"], *c["tasks"][t]["interval"]))
        panels["Δm"].append((c["delta_m"], *c["delta_m_interval"]))
    return labels, panels


def plot(args) -> None:
    """Every collected comparison as a forest plot (PNG): per task the accuracy difference from the
    single-task LoRAs it was compared with, and Δm, each with its 95% paired-bootstrap interval;
    blue where the interval lies above 0, red where below, grey where it holds 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, panels = plot_points()
    if not labels:
        sys.exit(f"no compare.json under {RESULTS}: train and collect a variant first")
    ys = list(range(len(labels)))[::-1]  # the first comparison at the top
    fig, axes = plt.subplots(1, len(panels), sharey=True, figsize=(3.0 * len(panels) + 3.5, 0.32 * len(labels) + 1.4))
    try:
        for ax, (name, points) in zip(axes, panels.items(), strict=True):
            for y, (value, lo, hi) in zip(ys, points, strict=True):
                color = "tab:blue" if lo > 0 else "tab:red" if hi < 0 else "0.35"
                ax.errorbar(value, y, xerr=[[value - lo], [hi - value]], fmt="o", color=color, markersize=4, capsize=2)
            ax.axvline(0, color="k", linewidth=0.8)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("Δm (%)" if name == "Δm" else "Δ accuracy (points)", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(ys, labels, fontsize=8)
        fig.suptitle("against one LoRA per task, whole dev splits, 95% paired-bootstrap intervals", fontsize=10)
        fig.tight_layout()
        with atomic_path(Path(args.out)) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    print(f"wrote {args.out} ({len(labels)} comparisons)")


def _cells(values: list[tuple[float, float | None]]) -> str:
    """Accuracies as table cells: `mean ± std` over seeds, or the value of one seed (std None)."""
    return " | ".join(f"{m:.1f}" if sd is None else f"{m:.1f} ± {sd:.1f}" for m, sd in values)


def _results_file(name: str) -> Path:
    """RESULTS/name/results.json, or that of the one seed of a variant trained with `--seeds S`
    (its run is RESULTS/name/seed-S)."""
    path = RESULTS / name / "results.json"
    seeds = sorted((RESULTS / name).glob("seed-*/results.json"))
    return seeds[0] if not path.is_file() and len(seeds) == 1 else path


def _fine_tuned_runs(name: str, seeds: list[int] | None) -> list[dict]:
    """The collected `fine_tuned` results of a variant: RESULTS/name (or its one seed), or one per seed."""
    paths = [_results_file(name)] if not seeds else [RESULTS / name / f"seed-{s}" / "results.json" for s in seeds]
    runs = []
    for path in paths:
        if not path.is_file():
            how = f" --seeds {' '.join(map(str, seeds))}" if seeds else ""
            sys.exit(f"{path} not found: train and collect {name}{how} first")
        runs.append(json.loads(path.read_text())["fine_tuned"])
    return runs


def versus(args) -> None:
    """Variant A against variant B on the same dev rows (collected results): per-task Δ and Δm of A
    relative to B with 95% paired-bootstrap intervals, as compare reports A against the singles.
    With --seeds, each row's score is first averaged over the seeds (as compare --seeds does), and
    each task's accuracy is shown as mean ± std over them. Two single-task runs (e.g.
    `single-r16-lr1e-3-sum/rte single-r16-lr1e-3/rte`) are compared on the tasks both scored."""
    from multitune.analysis.bootstrap import mean_std, paired_bootstrap, seed_mean_rows

    a_runs, b_runs = _fine_tuned_runs(args.a, args.seeds), _fine_tuned_runs(args.b, args.seeds)
    tasks = [t for t in TASKS if all(t in r["rows"] for r in a_runs + b_runs)]
    if not tasks:
        sys.exit(f"{args.a} and {args.b} have no task in common")
    a = {t: seed_mean_rows([r["rows"][t] for r in a_runs]) for t in tasks}
    b = {t: seed_mean_rows([r["rows"][t] for r in b_runs]) for t in tasks}
    boot = paired_bootstrap(a, b, {t: True for t in tasks})
    n = len(a_runs)

    def cell(runs: list[dict], t: str) -> tuple[float, str]:
        mean, std = mean_std([r["tasks"][t]["accuracy"] for r in runs])
        return mean, f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"

    seeds = f" (mean ± std over seeds {' '.join(map(str, args.seeds))})" if n > 1 else ""
    print(f"| task | {args.a}{seeds} | {args.b} | Δ (95% interval) |")
    print("|---|---|---|---|")
    for t in tasks:
        lo, hi = boot["tasks"][t]["delta"]
        (acc_a, text_a), (acc_b, text_b) = cell(a_runs, t), cell(b_runs, t)
        print(f"| {t} | {text_a} | {text_b} | {acc_a - acc_b:+.2f} [{lo:+.2f}, {hi:+.2f}] |")
    lo, hi = boot["delta_m"]
    print(
        f"\nΔm of {args.a} relative to {args.b}: 95% interval [{lo:+.2f}, {hi:+.2f}]%, "
        f"{args.a} better in {100 * boot['p_better']:.0f}% of resamples"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder of the full data sets (train)")
    parser.add_argument("--runs", help="folder of the study's runs")
    parser.add_argument("--threads", type=int)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("variant", choices=[*VARIANTS, AFFINITY_VARIANT])
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--set", nargs="*", default=[], help="more overrides (e.g. train.lr=1e-3)")
    p.add_argument("--name", help="folder of the variant's runs (default: its name), e.g. cgc-count-lr1e-3")
    p.add_argument(
        "--singles",
        default=SINGLES,
        help=f"folder of the single-task baselines (default {SINGLES}); another one trains baselines with --set's "
        "settings (e.g. single-r16-lr1e-3 with train.lr=1e-3), where the default folder's are reused as trained",
    )
    p.add_argument("--merge", help="also merge the single-task LoRAs with this method (e.g. cat) and compare")
    p.add_argument("--merge-weight", type=float, help="--merge: every run's weight (default 1)")
    p.add_argument("--merge-density", type=float, help="--merge ties / dare_*: density (default 0.5)")
    sub.add_parser("zero-shot")
    sub.add_parser("affinity")
    sub.add_parser("collect")
    p = sub.add_parser("restore")
    p.add_argument("variants", nargs="*", help="also these collected multi-task variants, e.g. cgc-count-lr1e-3")
    sub.add_parser("table")
    p = sub.add_parser("plot")
    p.add_argument("--out", default=str(RESULTS / "study.png"), help="PNG to write (default docs/results/study.png)")
    p = sub.add_parser("versus")
    p.add_argument("a", help="a collected variant, e.g. cgc-count")
    p.add_argument("b", help="the one to compare it with, e.g. lora-r16")
    p.add_argument("--seeds", type=int, nargs="+", help="compare the seeds' runs (RESULTS/VARIANT/seed-<s>)")
    args = parser.parse_args()
    try:
        _run(args)
    except MultituneError as e:  # bad input (a config, an override, a run dir in use): one line, no traceback
        raise SystemExit(f"quality: {e}") from None


def _run(args: argparse.Namespace) -> None:
    if args.command == "train":
        if not (args.data and args.runs):
            sys.exit("train needs --data and --runs")
        train_variant(args)
    elif args.command == "zero-shot":
        if not (args.data and args.runs):
            sys.exit("zero-shot needs --data and --runs")
        zero_shot(args)
    elif args.command == "affinity":
        if not (args.data and args.runs):
            sys.exit("affinity needs --data and --runs")
        affinity(args)
    elif args.command == "collect":
        if not args.runs:
            sys.exit("collect needs --runs")
        collect(args)
    elif args.command == "restore":
        if not (args.data and args.runs):
            sys.exit("restore needs --data and --runs")
        restore(args)
    elif args.command == "versus":
        versus(args)
    elif args.command == "plot":
        plot(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
