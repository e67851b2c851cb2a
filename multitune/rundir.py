"""The run directory: every name multitune writes into one, and how the commands find a run again.

runs/x/config.yaml        the resolved config (paths absolute)
runs/x/model/             PEFT adapter (lora, adapter, experts) or full weights (full, freeze) + tokenizer
runs/x/metrics.jsonl      every logged figure, per task, one JSON object per line
runs/x/results.json       zero-shot and fine-tuned metrics per task; results.md the table
runs/x/checkpoints/       atomic checkpoints for --resume; best.safetensors (early stopping)
runs/x/evals/             later `multitune eval` results, one file each
runs/x/tb/                TensorBoard events (train.report_to; mlflow.db for MLflow, trackers.json)
runs/x/*.png, *.md        interference / affinity / gates heatmaps, affinity.md, compare.json/.md
runs/x/report.html        `multitune report`; export/ and merged/ (exports, a DAPT stage's merge)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from multitune.config import RunConfig, dump_config, load_config
from multitune.data.encode import Encoder
from multitune.data.sources import SPLITS, Example, load_split
from multitune.errors import MultituneError
from multitune.files import write_atomic
from multitune.lock import LOCK, RunLock
from multitune.reporting.tables import results_table
from multitune.training.checkpoint import list_checkpoints

CONFIG = "config.yaml"
MODEL = "model"
RESULTS = "results.json"
TABLE = "results.md"
METRICS = "metrics.jsonl"
EVALS = "evals"
CHECKPOINTS = "checkpoints"
MARKER = ".multitune-run"
BEST = "best.safetensors"
TENSORBOARD = "tb"
MLFLOW_DB = "mlflow.db"
TRACKERS = "trackers.json"
REPORT = "report.html"
INTERFERENCE_PNG = "interference.png"
AFFINITY_PNG = "affinity.png"
GATES_PNG = "gates.png"
AFFINITY_MD = "affinity.md"
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
EXPORT = "export"
MERGED = "merged"

# Every name multitune writes into a run dir. --overwrite removes these and nothing else, and
# only from a dir that holds nothing else: a folder a user keeps other files in is never emptied.
# (wandb/, .aim, dvclive/: where those trackers write by default, see training/tracking.py)
RUN_ENTRIES = {
    MARKER,
    LOCK,
    CONFIG,
    MODEL,
    RESULTS,
    TABLE,
    METRICS,
    EVALS,
    CHECKPOINTS,
    BEST,
    TENSORBOARD,
    MLFLOW_DB,
    TRACKERS,
    "wandb",
    ".aim",
    "dvclive",
    REPORT,
    INTERFERENCE_PNG,
    AFFINITY_PNG,
    GATES_PNG,
    AFFINITY_MD,
    COMPARE_JSON,
    COMPARE_MD,
    EXPORT,
    MERGED,
}


def _ours(name: str) -> bool:
    """A run-dir entry multitune wrote: a known name, or one of its hidden temporaries."""
    return name in RUN_ENTRIES or (name.startswith(".") and name.endswith((".tmp", ".old")))


def child(parent: str | Path, name: str) -> Path:
    """`parent / name`, refused unless it stays inside `parent` (task names become paths)."""
    path = Path(parent) / name
    if name in ("", ".", "..") or Path(parent).resolve() not in path.resolve().parents:
        raise MultituneError(f"'{name}' would lead outside {parent}: use a plain name")
    return path


def check_output(cfg: RunConfig, overwrite: bool, resume: bool) -> Path:
    """Refuse an output dir that is unsafe to write, before anything is loaded or written.

    Never the working directory, one of its parents, the home directory or a folder holding the
    run's own inputs; not a file or under one; writable; empty unless resumed or replaced, and
    replaced only when it is recognisably a multitune run holding nothing else."""
    if not str(cfg.output).strip():
        raise MultituneError("output is empty: name the run directory to write (e.g. output=runs/x)")
    out = Path(cfg.output).expanduser()
    where = out.resolve()
    cwd = Path.cwd().resolve()
    for special, what in ((cwd, "the working directory"), (Path.home().resolve(), "the home directory")):
        if where == special or where in special.parents:
            name = what if where == special else f"a parent of {what}"
            raise MultituneError(f"output {cfg.output!r} is {name}: name a run directory of its own")
    if where == Path(where.anchor):
        raise MultituneError(f"output {cfg.output!r} is the root directory: name a run directory of its own")
    for label, path in _inputs(cfg):
        p = Path(path).expanduser().resolve()
        if where == p or where in p.parents:
            raise MultituneError(f"output {out} holds {label} ({path}): write the run somewhere else")
    ancestor = where
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MultituneError(f"output {out}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MultituneError(f"output {out}: {ancestor} is not writable")
    if resume:
        if not (out / CONFIG).is_file():
            raise MultituneError(f"--resume: {out} holds no run to resume (no {CONFIG})")
        if (out / MODEL).is_dir() and not list_checkpoints(out / CHECKPOINTS):
            raise MultituneError(
                f"--resume: {out} is a finished run with no checkpoint to continue from "
                "(set train.save_every to keep some); --overwrite trains it again"
            )
        return out
    entries = [e for e in out.iterdir() if e.name != LOCK] if out.is_dir() else []
    if entries:
        if not overwrite:
            raise MultituneError(
                f"output dir {out} is not empty: pass --overwrite to replace it or --resume to continue it"
            )
        _check_replaceable(out, entries)
    return out


def _inputs(cfg: RunConfig) -> list[tuple[str, str]]:
    found = []
    for t in cfg.tasks:
        if t.data.hf_dataset is None:
            found += [(f"the {s} data of task '{t.name}'", getattr(t.data, s)) for s in SPLITS if getattr(t.data, s)]
    if cfg.retention is not None and cfg.retention.data is not None:
        found.append(("the retention data", cfg.retention.data))
    if Path(cfg.model).expanduser().exists():
        found.append(("the base model", cfg.model))
    return found


def _check_replaceable(out: Path, entries: list[Path]) -> None:
    foreign = sorted(e.name for e in entries if not _ours(e.name))
    if foreign:
        raise MultituneError(
            f"--overwrite: {out} holds '{foreign[0]}', which is not part of a multitune run; "
            "only a run dir is replaced: move that file or choose another output"
        )
    if not (out / MARKER).is_file() and not _is_run_config(out / CONFIG):
        raise MultituneError(f"--overwrite: {out} is not a multitune run (no {MARKER} or run {CONFIG}); not replaced")


def _is_run_config(path: Path) -> bool:
    try:
        load_config(path)
    except MultituneError:
        return False
    return True


def prepare_run_dir(cfg: RunConfig, overwrite: bool, resume: bool, lock: RunLock) -> Path:
    """Under `lock`: check the output again (another command may have written it meanwhile),
    clear a replaced run of its files, mark the dir as a run and write its config."""
    out = check_output(cfg, overwrite, resume)
    lock.acquire()
    if not resume:
        for entry in out.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        write_atomic(out / MARKER, "a multitune run directory: `multitune train --overwrite` may replace it\n")
    write_atomic(out / CONFIG, dump_config(cfg))
    return out


# What --resume may change: how long to train and how often to log, evaluate and save. Anything
# else (model, method, data, lr, batch, seed...) would make the resumed run another run.
SAFE_ON_RESUME = (
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.threads",
    "train.report_to",
    "train.early_stopping",
    "eval.",
    "output",
    "cache_dir",
)


# What a finished run may differ in from the config a comparison asks for and still be its run:
# where it was written and how it logged and saved. Anything else (lr, data, eval rows...) is
# reported next to the comparison that reuses it.
SAME_RESULTS = (
    "train.log_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.threads",
    "train.report_to",
    "eval.zero_shot",
    "output",
    "cache_dir",
)


def config_changes(before: RunConfig, after: RunConfig) -> dict[str, tuple[str, str]]:
    """Every dotted key whose value differs between two configs: key -> (before, after), shown as
    JSON ("unset" where a key is missing)."""
    b, a = _flat(before.model_dump(mode="json")), _flat(after.model_dump(mode="json"))
    keys = sorted(k for k in b.keys() | a.keys() if b.get(k, _NONE) != a.get(k, _NONE))
    return {k: (_show(b.get(k, _NONE)), _show(a.get(k, _NONE))) for k in keys}


def describe_changes(changes: dict[str, tuple[str, str]], limit: int = 4) -> str:
    """'train.lr (0.0005 -> 0.001), ... and N more': one line for a message."""
    shown = ", ".join(f"{k} ({b} -> {a})" for k, (b, a) in list(changes.items())[:limit])
    return shown + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def reused_changes(cfg: RunConfig) -> dict[str, tuple[str, str]]:
    """What the finished run in `cfg.output` was trained with that `cfg` would set otherwise
    (saved -> asked), leaving out what cannot change its results (`SAME_RESULTS`). A comparison
    that reuses the run says so: reusing baselines trained at another learning rate is a fair
    choice only when the reader knows it."""
    try:
        saved = load_run_config(cfg.output)
    except MultituneError as exc:  # results without a readable config: reused, and said so
        return {CONFIG: (f"not readable: {exc}", "this comparison's config")}
    changes = config_changes(saved, cfg)
    return {k: v for k, v in changes.items() if not k.startswith(SAME_RESULTS)}


def resumed_config(cfg: RunConfig, say) -> RunConfig:
    """`cfg` for continuing the run in `cfg.output`: refused (one line naming the keys) when it
    changes what the run trains; the safe changes are announced (and then recorded in its
    config.yaml by `prepare_run_dir`)."""
    changed = config_changes(load_run_config(cfg.output), cfg)
    unsafe = {k: v for k, v in changed.items() if not k.startswith(SAFE_ON_RESUME)}
    if unsafe:
        raise MultituneError(
            f"--resume: the config changes {describe_changes(unsafe)} from {Path(cfg.output) / CONFIG}; that "
            "would be another run: resume with the run's own config, or train a new run"
        )
    for k, (b, a) in changed.items():
        say(f"[resume] {k}: {b} -> {a}")
    return cfg


_NONE = object()


def _flat(tree, prefix: str = "") -> dict:
    """Dotted keys of a dumped config; tasks by name (`tasks[sst2].prompt`)."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif prefix == "tasks." and isinstance(tree, list):
        for i, item in enumerate(tree):
            name = item.get("name", i) if isinstance(item, dict) else i
            out.update(_flat(item, f"tasks[{name}]."))
    else:
        out[prefix[:-1]] = tree
    return out


def _show(value) -> str:
    return "unset" if value is _NONE else json.dumps(value)


def check_splits(cfg: RunConfig) -> None:
    """Validate every row of the splits a run does not otherwise load (a test split while it
    evaluates on dev), so that a bad row is found before training, not by a later command."""
    for task in cfg.tasks:
        for split in SPLITS:
            if split not in ("train", "dev", cfg.eval.split):
                load_split(task, split)


def load_examples(cfg: RunConfig, split: str) -> dict[str, list[Example]]:
    """Validated examples of one split for every task (tasks without that split are left out)."""
    out = {}
    for task in cfg.tasks:
        limit = task.max_train_examples if split == "train" else (task.max_eval_examples or cfg.eval.max_examples)
        rows = load_split(task, split, limit)
        if rows:
            out[task.name] = rows
    return out


def make_encoder(cfg: RunConfig, tokenizer) -> Encoder:
    return Encoder(
        tokenizer,
        {t.name: i for i, t in enumerate(cfg.tasks)},
        cfg.train.max_length,
        cfg.chat_template,
    )


def load_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise MultituneError(f"{run_dir} is not a run directory (no {CONFIG})")
    return load_config(run_dir / CONFIG)


def read_results(run_dir: Path) -> dict:
    path = Path(run_dir) / RESULTS
    return json.loads(path.read_text()) if path.is_file() else {}


def write_results(run_dir: Path, results: dict, cfg: RunConfig) -> str:
    """results.json + results.md; returns the markdown table."""
    write_atomic(Path(run_dir) / RESULTS, json.dumps(results, indent=2))
    table = results_table(results, cfg)
    write_atomic(Path(run_dir) / TABLE, table + "\n")
    return table


def write_evaluation(
    run_dir: Path, key: str, split: str, result: dict, cfg: RunConfig, paired: bool = True
) -> tuple[str, Path]:
    """Store a later evaluation of a run in a file of its own under RUN/evals/ (results.json is
    the record of training and is never rewritten) and return its table. The run's other column
    (zero-shot beside a fine-tuned evaluation, and the reverse) is set beside it, with Δ, only
    when both scored the same split with the same rows of every task. Returns (table, file)."""
    n = {t: m["n"] for t, m in result["tasks"].items()}
    model = "base" if key == "zero_shot" else "trained"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(run_dir) / EVALS / f"{stamp}-{model}-{split}-n{sum(n.values())}"
    columns = {key: result}
    other = "fine_tuned" if key == "zero_shot" else "zero_shot"
    saved = read_results(run_dir).get(other)
    note = ""
    if paired and saved is not None:
        saved_n = {t: m["n"] for t, m in saved["tasks"].items()}
        if load_run_config(run_dir).eval.split == split and saved_n == n:
            columns[other] = saved
        else:
            note = (
                f"\n(no Δ: the run's {other.replace('_', '-')} column scored other rows: "
                f"{load_run_config(run_dir).eval.split} {_sizes(saved_n)}; this one {split} {_sizes(n)})"
            )
    columns = {c: columns[c] for c in ("zero_shot", "fine_tuned") if c in columns}
    path.parent.mkdir(exist_ok=True)
    record = {"model": model, "split": split, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), key: result}
    write_atomic(path.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    table = results_table(columns, cfg) + note
    write_atomic(path.with_suffix(".md"), table + "\n")
    return table, path.with_suffix(".json")


def _sizes(n: dict[str, int]) -> str:
    return ", ".join(f"{t} n={k}" for t, k in n.items())
