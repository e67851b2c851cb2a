"""Progress: a bar on a terminal, plain periodic lines in a log file; the training bar shows the
figures the next metrics.jsonl line records."""

import io

import torch

from multitune.progress import progress
from multitune.training.metrics_log import LossWindow


def test_a_log_file_gets_plain_lines_not_carriage_returns():
    out = io.StringIO()  # not a terminal
    with progress(10, "train", initial=2, every=0, file=out) as bar:
        for _ in range(3):
            bar.set_postfix({"sst2 loss": "0.500"})
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3
    assert lines[-1].startswith("train: 5/10 (50%) ") and lines[-1].endswith("| sst2 loss=0.500")
    assert "s/it, eta " in lines[-1]


def test_lines_are_spaced_by_the_interval_and_the_last_always_shows():
    out = io.StringIO()
    bar = progress(4, "train", every=3600, file=out)
    for _ in range(4):
        bar.update(1)
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["train: 1/4", "train: 4/4"]


class _Batch:
    def __init__(self, tasks, tokens):
        self.row_task_ids = torch.tensor(tasks)
        self._tokens = torch.tensor(tokens)

    def row_tokens(self):
        return self._tokens


def test_the_bar_shows_what_the_next_log_line_records():
    window = LossWindow(["sst2", "rte"])
    window.add(_Batch([0, 0, 1], [5, 5, 7]), torch.tensor([1.0, 3.0, 0.5]), torch.zeros(6))
    window.add(_Batch([0], [4]), torch.tensor([5.0]), torch.zeros(2))
    shown = window.running()
    _, logged = window.flush()
    assert shown == {t: logged[t]["loss"] for t in logged} == {"sst2": 3.0, "rte": 0.5}
    assert window.running() == shown  # right after the log line: the values it recorded
    window.add(_Batch([1], [3]), torch.tensor([1.5]), torch.zeros(1))
    assert window.running() == {"sst2": 3.0, "rte": 1.5}


def test_evaluation_reports_its_progress_per_row(run_config, capsys):
    from multitune import rundir
    from multitune.config import validate_config
    from multitune.evaluation.evaluator import evaluate
    from multitune.models.load import load_base

    cfg = validate_config(run_config())
    model, tokenizer = load_base(cfg)
    rows = rundir.load_examples(cfg, "dev")
    total = sum(len(r) for r in rows.values())
    evaluate(model, rundir.make_encoder(cfg, tokenizer), cfg, rows)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval: ")]
    assert lines[-1].startswith(f"eval: {total}/{total} (100%)") and lines[-1].endswith("| task=rte")
    quiet = evaluate(model, rundir.make_encoder(cfg, tokenizer), cfg, rows, show_progress=False)
    assert "eval: " not in capsys.readouterr().err and quiet["tasks"]
