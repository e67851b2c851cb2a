"""What multitune guarantees (docs/guarantees.md): it never deletes or truncates what it did not
write, never loads a pickle, locks a run dir while writing it, resumes only what it can verify,
and answers bad input with one line and exit code 2.

Each case runs the command as a user would (`multitune.cli.main`) from a scratch folder holding
a config, data and a note, and checks the exit code, the one-line message, and that nothing in
the scratch folder outside the run dir changed (hashes before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitune.cli import main
from multitune.lock import RunLock

ROOT = Path(__file__).resolve().parents[1]


def tree_hashes(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file under `root` (but not under `skip`) -> SHA-256 of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = ""
    return out


@pytest.fixture
def scratch(tmp_path, run_config, monkeypatch):
    """A user's folder: run.yaml, data/ (the two tasks' rows), notes.txt; cwd is this folder and
    the run goes to runs/x."""
    data = tmp_path / "data"
    data.mkdir()
    raw = run_config(train={"max_steps": 2}, output="runs/x")
    for task in raw["tasks"]:
        for split in ("train", "dev"):
            src = Path(task["data"][split])
            rows = src.read_text(encoding="utf-8").splitlines()[:40]
            dst = data / f"{task['name']}-{split}.jsonl"
            dst.write_text("\n".join(rows) + "\n", encoding="utf-8")
            task["data"][split] = f"data/{dst.name}"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "notes.txt").write_text("my notes\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of one command; an exception escaping `main` fails the test."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("multitune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ----------------------------------------------------------------------------- data loss


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        ("", "output is empty"),
        (".", "is the working directory"),
        ("..", "is a parent of the working directory"),
        ("/", "is a parent of the working directory"),
        ("data", "holds the train data of task 'sst2'"),
        ("notes.txt", "notes.txt is a file, not a directory"),
        ("notes.txt/run", "notes.txt is a file, not a directory"),
    ],
)
def test_overwrite_never_deletes_what_is_not_a_run(scratch, capsys, output, fragment):
    before = tree_hashes(scratch)
    code, err = run_cli(capsys, "train", "run.yaml", f"output={output}", "--overwrite")
    assert code == 2
    one_line_error(err, fragment)
    assert tree_hashes(scratch) == before


def test_overwrite_replaces_a_run_and_nothing_else(scratch, capsys):
    assert run_cli(capsys, "train", "run.yaml")[0] == 0
    run = scratch / "runs/x"
    assert (run / ".multitune-run").is_file()
    (run / "mine.txt").write_text("a file of the user's inside the run dir")
    before = tree_hashes(scratch)
    code, err = run_cli(capsys, "train", "run.yaml", "--overwrite")
    assert code == 2
    one_line_error(err, "holds 'mine.txt', which is not part of a multitune run")
    assert tree_hashes(scratch) == before
    (run / "mine.txt").unlink()
    outside = tree_hashes(scratch, skip=run)
    assert run_cli(capsys, "train", "run.yaml", "--overwrite")[0] == 0
    assert tree_hashes(scratch, skip=run) == outside


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "x" * 101, ""])
def test_task_names_cannot_become_paths(scratch, capsys, name):
    before = tree_hashes(scratch)
    code, err = run_cli(capsys, "compare", "run.yaml", f"tasks.0.name={name}", "--overwrite")
    assert code == 2
    one_line_error(err, "run.yaml: tasks")
    assert tree_hashes(scratch) == before


def test_compare_keeps_single_task_runs_inside_their_folder(tmp_path):
    from multitune.errors import MultituneError
    from multitune.rundir import child

    assert child(tmp_path, "sst2") == tmp_path / "sst2"
    for bad in ("..", "../x", "/etc", "a/../../b"):
        with pytest.raises(MultituneError, match="would lead outside"):
            child(tmp_path, bad)


class _Payload:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_loads_no_pickle(scratch, capsys):
    args = ("train", "run.yaml", "train.save_every=2")
    assert run_cli(capsys, *args, "train.max_steps=4")[0] == 0  # checkpoints 2 and 4
    ckpts = scratch / "runs/x/checkpoints"
    marker = scratch / "PWNED"
    # the newest checkpoint as an older multitune wrote it: a pickle that runs code when loaded
    legacy = ckpts / "step-00000099"
    legacy.mkdir()
    with open(legacy / "optimizer.pt", "wb") as f:
        pickle.dump({"optimizer": _Payload(marker)}, f)
    capsys.readouterr()
    assert main([*args, "train.max_steps=6", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "[resume] skipping runs/x/checkpoints/step-00000099: written by an older multitune as a pickle" in out
    assert "[resume] from step-00000004" in out
    assert not marker.exists()
    # a pickle in place of a checkpoint's tensors: it fails verification and is never opened
    with open(ckpts / "step-00000006/state.safetensors", "wb") as f:
        pickle.dump(_Payload(marker), f)
    code, err = run_cli(capsys, *args, "train.max_steps=8", "--resume")
    assert code == 2
    one_line_error(err, "no usable checkpoint", "step-00000006: state.safetensors has")
    assert not marker.exists()


def test_damaged_checkpoints_fall_back_with_a_warning(scratch, capsys):
    args = ("train", "run.yaml", "train.max_steps=6", "train.save_every=2")
    assert run_cli(capsys, *args, "--resume")[0] == 2  # no run yet
    from multitune.config import load_config
    from multitune.training.loop import train

    cfg = load_config(scratch / "run.yaml", ["train.max_steps=6", "train.save_every=2"])
    train(cfg, stop_after=5)  # checkpoints 4 and 5
    ckpts = scratch / "runs/x/checkpoints"
    weights = ckpts / "step-00000005/trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated by a crash
    metrics = scratch / "runs/x/metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "split": "tr')  # torn last line
    capsys.readouterr()
    assert main(list(args) + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "[resume] skipping runs/x/checkpoints/step-00000005: trainable.safetensors has 100 bytes" in out
    assert "[resume] from step-00000004" in out
    assert "dropping its torn last line" in out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 6
    # a missing state.json: the checkpoint is skipped too; with none usable left, one line
    for c in ckpts.iterdir():
        (c / "state.json").unlink()
    code, err = run_cli(capsys, *args, "train.max_steps=8", "--resume")
    assert code == 2
    one_line_error(err, "no usable checkpoint", "state.json is missing")


def test_predict_never_truncates_its_output_or_input(scratch, capsys):
    assert run_cli(capsys, "train", "run.yaml")[0] == 0
    good = scratch / "in.jsonl"
    good.write_text('{"text": "a fine film"}\n')
    preds = scratch / "preds.jsonl"
    preds.write_text("earlier predictions\n")
    bad = scratch / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text"}\n')
    run = "runs/x"
    code, err = run_cli(capsys, "predict", run, "--task", "sst2", "--input", "bad.jsonl", "--output", "preds.jsonl")
    assert code == 2
    one_line_error(err, "bad.jsonl:2: field 'text' is missing")
    assert preds.read_text() == "earlier predictions\n"
    code, err = run_cli(capsys, "predict", run, "--task", "sst2", "--input", "in.jsonl", "--output", "./in.jsonl")
    assert code == 2
    one_line_error(err, "is the --input file")
    assert good.read_text() == '{"text": "a fine film"}\n'
    code, err = run_cli(capsys, "predict", run, "--task", "sst2", "--input", "in.jsonl", "--output", "data")
    assert code == 2
    one_line_error(err, "--output data is a directory")
    code, err = run_cli(capsys, "predict", run, "--task", "sst2", "--input", "nope.jsonl")
    assert code == 2
    one_line_error(err, "--input nope.jsonl: no such file")
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    code, err = run_cli(capsys, "predict", run, "--task", "sst2", "--input", "bad.jsonl")
    assert code == 2
    one_line_error(err, "bad.jsonl:2: not valid UTF-8 (byte 0xe9 at column 14)")
    assert run_cli(capsys, "predict", run, "--task", "sst2", "--input", "in.jsonl", "--output", "preds.jsonl")[0] == 0
    assert json.loads(preds.read_text())["prediction"] in ("negative", "positive")
    assert not list(scratch.glob(".preds.jsonl.*"))


def _hold_lock(run: Path) -> subprocess.Popen:
    code = f"from multitune.lock import RunLock; import time; RunLock({str(run)!r}).acquire(); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(200):
        if (run / ".lock").is_file() and (run / ".lock").read_text().strip() == str(proc.pid):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the helper never took the lock")


def test_a_run_dir_has_one_writer(scratch, capsys):
    assert run_cli(capsys, "train", "run.yaml", "train.save_every=1")[0] == 0
    run = scratch / "runs/x"
    proc = _hold_lock(run)
    try:
        before = tree_hashes(scratch)
        for argv in (
            ("train", "run.yaml", "train.max_steps=3", "--resume"),
            ("train", "run.yaml", "--overwrite"),
            ("export", "runs/x"),
        ):
            code, err = run_cli(capsys, *argv)
            assert code == 2, argv
            one_line_error(err, f"runs/x is in use by another multitune process (pid {proc.pid})")
        assert tree_hashes(scratch) == before
    finally:
        proc.kill()
        proc.wait()
    # the holder died without releasing anything: the lock is gone with it
    assert run_cli(capsys, "train", "run.yaml", "train.max_steps=3", "--resume")[0] == 0
    with RunLock(run):
        pass


def test_export_task_names_are_checked_for_every_method(scratch, capsys):
    assert run_cli(capsys, "train", "run.yaml")[0] == 0
    before = tree_hashes(scratch)
    for task in ("../../../../x", "mnli"):
        code, err = run_cli(capsys, "export", "runs/x", "--task", task)
        assert code == 2
        one_line_error(err, f"unknown task '{task}'; this run has: sst2, rte")
    assert tree_hashes(scratch) == before


def test_eval_with_overrides_keeps_the_runs_results(scratch, capsys):
    assert run_cli(capsys, "train", "run.yaml", "eval.zero_shot=true")[0] == 0
    run = scratch / "runs/x"
    results = (run / "results.json").read_bytes(), (run / "results.md").read_bytes()
    capsys.readouterr()
    assert main(["eval", "runs/x", "tasks.sst2.max_eval_examples=5", "tasks.rte.max_eval_examples=5"]) == 0
    out = capsys.readouterr().out
    assert ((run / "results.json").read_bytes(), (run / "results.md").read_bytes()) == results
    saved = sorted((run / "evals").glob("*.json"))
    assert len(saved) == 1 and saved[0].name.endswith("-trained-dev-n10.json")
    record = json.loads(saved[0].read_text())
    assert {t: m["n"] for t, m in record["fine_tuned"]["tasks"].items()} == {"sst2": 5, "rte": 5}
    assert "| task | metric | n | fine-tuned |" in out and "Δ" not in out.split("(no Δ")[0]
    assert "(no Δ: the run's zero-shot column scored other rows: dev sst2 n=16, rte n=16" in out


# ----------------------------------------------------------------------------- resume


def test_resume_refuses_a_changed_model_and_records_safe_changes(scratch, capsys):
    assert run_cli(capsys, "train", "run.yaml", "train.save_every=1")[0] == 0
    before = tree_hashes(scratch)
    code, err = run_cli(capsys, "train", "run.yaml", "train.save_every=1", "method.rank=8", "train.lr=0.1", "--resume")
    assert code == 2
    one_line_error(err, "--resume: the config changes method.rank (4 -> 8), train.lr (0.001 -> 0.1)")
    assert tree_hashes(scratch) == before
    code, err = run_cli(capsys, "train", "run.yaml", "train.save_every=1", "train.max_steps=4", "--resume")
    assert code == 0, err
    saved = yaml.safe_load((scratch / "runs/x/config.yaml").read_text())
    assert saved["train"]["max_steps"] == 4
    assert json.loads((scratch / "runs/x/results.json").read_text())["train"]["steps"] == 4


def test_resume_without_a_checkpoint_says_so(scratch, capsys):
    assert run_cli(capsys, "train", "run.yaml")[0] == 0  # finished, save_every unset
    code, err = run_cli(capsys, "train", "run.yaml", "--resume")
    assert code == 2
    one_line_error(err, "is a finished run with no checkpoint to continue from")
    (scratch / "runs/x/model").rename(scratch / "runs/x/.model.old")  # as if killed before the end
    capsys.readouterr()
    assert main(["train", "run.yaml", "--resume"]) == 0
    assert "has no checkpoint yet: training starts again from step 0" in capsys.readouterr().out


def test_nothing_is_written_before_the_model_loads(scratch, capsys):
    code, err = run_cli(capsys, "train", "run.yaml", "model=./no-such-model")
    assert code == 2
    one_line_error(err, "model path not found: ./no-such-model")
    assert not (scratch / "runs").exists()
    assert run_cli(capsys, "train", "run.yaml")[0] == 0  # no --overwrite needed


def test_interrupt_saves_a_checkpoint_and_resume_continues(scratch):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "multitune", "train", "run.yaml", "train.max_steps=400", "train.threads=1"]
    proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = scratch / "runs/x/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count('"split": "train"') >= 3):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGINT at step" in out and "--resume continues" in out
    assert err.strip().splitlines()[-1] == "multitune: interrupted"
    assert "\r" not in err and "train: " in err  # a log file gets plain progress lines, not a redrawn bar
    ckpts = sorted((scratch / "runs/x/checkpoints").iterdir())
    assert len(ckpts) == 1
    stopped = int(ckpts[0].name.split("-")[1])
    assert 3 <= stopped < 400
    done = subprocess.run([*cmd, "--resume"], cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"[resume] from {ckpts[0].name}" in done.stdout


def test_a_non_finite_loss_stops_the_run_and_keeps_good_checkpoints(scratch, capsys):
    code, err = run_cli(capsys, "train", "run.yaml", "train.lr=inf")
    assert code == 2
    one_line_error(err, "train.lr: Input should be a finite number")
    args = ("train", "run.yaml", "train.lr=1e30", "train.save_every=1", "train.max_steps=6", "train.max_grad_norm=null")
    code, err = run_cli(capsys, *args)
    assert code == 2
    one_line_error(err, "not finite", "earlier checkpoints are intact")
    for ckpt in (scratch / "runs/x/checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "trainable.safetensors").values())
    assert not (scratch / "runs/x/model").exists()


# ----------------------------------------------------------------------------- one line for bad input


def test_invalid_utf8_names_the_file_and_line(scratch, capsys):
    data = scratch / "data/sst2-train.jsonl"
    lines = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(lines[:2]) + b'{"text": "\xff", "label": "positive"}\n')
    code, err = run_cli(capsys, "train", "run.yaml")
    assert code == 2
    one_line_error(err, f"{data}:3: not valid UTF-8 (byte 0xff")
    (scratch / "bad.yaml").write_bytes(b"model: x\n# caf\xe9\n")
    code, err = run_cli(capsys, "train", "bad.yaml")
    assert code == 2
    one_line_error(err, "bad.yaml:2: not valid UTF-8 (byte 0xe9)")
    csv = scratch / "d.csv"
    csv.write_bytes(b"text,label\ngood,positive\nbad \xff,negative\n")
    code, err = run_cli(capsys, "train", "run.yaml", f"tasks.sst2.data.train={csv}")
    assert code == 2
    one_line_error(err, f"{csv}:3: not valid UTF-8 (byte 0xff)")


def test_csv_without_header_and_objects_for_text_are_refused(scratch, capsys):
    csv = scratch / "d.csv"
    csv.write_text("a great film,positive\nawful,negative\n")
    code, err = run_cli(capsys, "train", "run.yaml", f"tasks.sst2.data.train={csv}")
    assert code == 2
    one_line_error(err, f"{csv}:1: the header line has no column 'label'", "starts with a header line")
    data = scratch / "data/sst2-train.jsonl"
    data.write_text('{"text": "fine", "label": "positive"}\n{"text": {"nested": 1}, "label": "negative"}\n')
    code, err = run_cli(capsys, "train", "run.yaml")
    assert code == 2
    one_line_error(err, f"{data}:2: field 'text' is an object; expected text")


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        ("{% for i in range(100000000) %}x{% endfor %}", "Range too big"),
        ("{{ 'a' * 10**12 }}", "'*' would make a value of 1,000,000,000,000 items"),
        ("{{ 10 ** 10000000 }}", "'**' would make a number of more than a million digits"),
        ("{% for i in range(99999) %}{% for j in range(99999) %}xxxxxxxxxx{% endfor %}{% endfor %}", "renders to"),
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "renders for more"),
        ("{{ text | int / 0 }}", "ZeroDivisionError"),
    ],
)
def test_templates_cannot_exhaust_the_machine(scratch, capsys, prompt, fragment):
    raw = yaml.safe_load((scratch / "run.yaml").read_text())
    raw["tasks"][0]["prompt"] = prompt
    (scratch / "run.yaml").write_text(yaml.safe_dump(raw))
    start = time.perf_counter()
    code, err = run_cli(capsys, "train", "run.yaml")
    assert code == 2
    one_line_error(err, "template", fragment)
    assert time.perf_counter() - start < 30


def test_output_that_is_a_file_or_unwritable(scratch, capsys, monkeypatch):
    code, err = run_cli(capsys, "train", "run.yaml", "output=notes.txt")
    assert code == 2
    one_line_error(err, "notes.txt is a file, not a directory")
    locked = scratch / "ro"
    locked.mkdir()
    # root may write anywhere, so the permission answer is the operating system's, stood in for here
    monkeypatch.setattr("multitune.rundir.os.access", lambda path, mode: Path(path) != locked)
    code, err = run_cli(capsys, "train", "run.yaml", "output=ro/run")
    assert code == 2
    one_line_error(err, f"output ro/run: {locked} is not writable")
    code, err = run_cli(capsys, "train", "run.yaml", "output=" + "x" * 300)
    assert code == 2
    one_line_error(err, "File name too long")
    assert not list(locked.iterdir())


def test_adapter_pickle_is_never_loaded(scratch, capsys):
    assert run_cli(capsys, "train", "run.yaml")[0] == 0
    model = scratch / "runs/x/model"
    (model / "adapter_model.safetensors").unlink()
    marker = scratch / "PWNED"
    with open(model / "adapter_model.bin", "wb") as f:
        pickle.dump(_Payload(marker), f)
    code, err = run_cli(capsys, "eval", "runs/x")
    assert code == 2
    one_line_error(err, "holds no adapter_model.safetensors (a pickled adapter file is never loaded)")
    assert not marker.exists()


def test_every_split_is_checked_before_training(scratch, capsys):
    dev = scratch / "data/sst2-dev.jsonl"
    rows = dev.read_text().splitlines()
    rows[30] = '{"text": "beyond max_examples", "label": "meh"}'
    dev.write_text("\n".join(rows) + "\n")
    code, err = run_cli(capsys, "train", "run.yaml", "eval.max_examples=5")
    assert code == 2
    one_line_error(err, f"{dev}:31: field 'label' has label 'meh'")
    dev.write_text("\n".join(rows[:30]) + "\n")
    test = scratch / "data/sst2-test.jsonl"
    test.write_text('{"text": "fine", "label": "positive"}\n{"label": "negative"}\n')
    code, err = run_cli(capsys, "train", "run.yaml", f"tasks.sst2.data.test={test}")
    assert code == 2
    one_line_error(err, f"{test}:2: field 'text' is missing")
    assert not (scratch / "runs").exists()
    assert run_cli(capsys, "train", "run.yaml")[0] == 0
    code, err = run_cli(capsys, "eval", "runs/x", "--split", "test")
    assert code == 2
    one_line_error(err, "no task of runs/x has a test split")


# ----------------------------------------------------------------------------- fuzz


def _mutations(rng, raw: dict, data: Path) -> tuple[list[str], bytes | None]:
    """One random bad (or harmless) change: config overrides and/or the bytes of one data file."""
    keys = [
        "train.lr", "train.max_steps", "train.batch_size", "train.max_length", "train.save_every",
        "train.warmup_ratio", "method.rank", "method.alpha", "method.dropout", "method.name", "mixing.strategy",
        "mixing.temperature", "eval.max_examples", "eval.batch_size", "tasks.0.name", "tasks.0.kind",
        "tasks.0.prompt", "tasks.0.labels", "tasks.1.target", "tasks.0.max_train_examples", "output",
        "train.seed", "train.epochs", "tasks.0.data.train", "train.balance", "nonsense.key",
    ]  # fmt: skip
    values = [
        "0", "-1", "1", "2", "1e-3", "inf", "nan", "-inf", "1e308", "abc", "", "[]", "{}", "[1, 2]", "null",
        "true", "..", "/", ".", "x" * 300, "{{ text }}", "{% for %}", "'", "\"", "lora", "moe_lora", "0.5",
        "notes.txt", "data", "runs/x/..", "~", "9999999999999999999999",
    ]  # fmt: skip
    overrides = [f"{rng.choice(keys)}={rng.choice(values)}" for _ in range(rng.randint(0, 2))]
    blob = None
    if rng.random() < 0.5:
        blob = bytearray(data.read_bytes())
        kind = rng.choice(["flip", "truncate", "type", "insert"])
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(blob))
                blob[i] = rng.randrange(256)
        elif kind == "truncate":
            blob = blob[: rng.randrange(len(blob))]
        elif kind == "type":
            bad = rng.choice(['{"text": 5, "label": "positive"}', '{"text": [], "label": "x"}', "[1]", "null", '"s"'])
            blob += (bad + "\n").encode()
        else:
            blob = blob[:50] + rng.choice([b"\x00", b"\xff\xfe", b"\n\n", b"{", b'"']) + blob[50:]
        blob = bytes(blob)
    return overrides, blob


@pytest.mark.slow
def test_fuzzed_configs_and_rows_exit_cleanly(scratch, capsys):
    import random

    rng = random.Random(1234)
    data = scratch / "data/sst2-train.jsonl"
    pristine = data.read_bytes()
    raw = yaml.safe_load((scratch / "run.yaml").read_text())
    codes = {0: 0, 2: 0}
    start = time.perf_counter()
    cases = 0
    while cases < 300 and time.perf_counter() - start < 150:
        overrides, blob = _mutations(rng, raw, data)
        data.write_bytes(blob if blob is not None else pristine)
        before = tree_hashes(scratch, skip=scratch / "runs")
        code = main(["train", "run.yaml", "train.max_steps=1", *overrides, "--overwrite"])
        err = capsys.readouterr().err
        case = (overrides, blob[:80] if blob else None)
        assert code in (0, 2), case
        assert "Traceback" not in err, case
        if code == 2:
            assert len([ln for ln in err.splitlines() if ln.startswith("multitune: error:")]) == 1, (case, err)
        assert tree_hashes(scratch, skip=scratch / "runs") == before, case
        codes[code] += 1
        cases += 1
    assert cases >= 100 and codes[0] > 0 and codes[2] > 0, (cases, codes)
