"""Reading and validating rows, templates, encoding (loss mask, truncation) and collation."""

import json

import pytest
import torch
from conftest import DATA

from multitune.config import TaskConfig
from multitune.data.collate import collate
from multitune.data.encode import IGNORE, Encoder
from multitune.data.sources import Example, load_split, read_rows
from multitune.errors import MultituneError
from multitune.models.base import load_tokenizer
from multitune.tasks.templates import render, template_fields


def _task(tmp_path, rows=None, text=None, **kw) -> TaskConfig:
    path = tmp_path / "train.jsonl"
    if text is None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    spec = {
        "name": "sent",
        "kind": "classification",
        "data": {"train": str(path)},
        "prompt": "Review: {{ text }}",
        "target": "{{ label }}",
        "labels": ["negative", "positive"],
    }
    spec.update(kw)
    return TaskConfig.model_validate(spec)


def test_real_split_loads_and_renders():
    task = TaskConfig.model_validate(
        {
            "name": "squad",
            "kind": "extractive_qa",
            "data": {"dev": str(DATA / "squad/dev.jsonl")},
            "prompt": "{{ context }}\nQ: {{ question }}",
            "target": "{{ answer }}",
        }
    )
    rows = load_split(task, "dev", limit=5)
    assert len(rows) == 5
    first = json.loads((DATA / "squad/dev.jsonl").read_text().splitlines()[0])
    assert rows[0].prompt == f"{first['context']}\nQ: {first['question']}"
    assert rows[0].target == first["answer"]
    assert rows[0].references == first["answers"]
    assert rows[0].where.endswith("dev.jsonl:1")
    assert load_split(task, "train") == []


def test_bad_json_line_names_file_and_line(tmp_path):
    task = _task(tmp_path, text='{"text": "ok", "label": "positive"}\n{"text": "broken",\n')
    with pytest.raises(MultituneError, match=r"train.jsonl:2: not valid JSON"):
        load_split(task, "train")


def test_missing_and_empty_field(tmp_path):
    task = _task(tmp_path, [{"text": "fine", "label": "positive"}, {"label": "negative"}])
    with pytest.raises(MultituneError, match=r"train.jsonl:2: field 'text' is missing \(task 'sent'\)"):
        load_split(task, "train")
    task = _task(tmp_path, [{"text": "  ", "label": "negative"}])
    with pytest.raises(MultituneError, match=r"train.jsonl:1: field 'text' is empty"):
        load_split(task, "train")


def test_unknown_label(tmp_path):
    task = _task(tmp_path, [{"text": "a", "label": "positive"}, {"text": "b", "label": "neutral"}])
    with pytest.raises(MultituneError, match=r"train.jsonl:2: field 'label' has label 'neutral', not one of"):
        load_split(task, "train")


def test_empty_and_missing_files(tmp_path):
    task = _task(tmp_path, text="\n\n")
    with pytest.raises(MultituneError, match=r"train.jsonl: the file has no rows"):
        load_split(task, "train")
    with pytest.raises(MultituneError, match=r"data file not found: .*nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(MultituneError, match=r"unknown data format '.txt'"):
        read_rows(tmp_path / "x.txt")
    with pytest.raises(MultituneError, match="expected a JSON object"):
        load_split(_task(tmp_path, text="[1, 2]\n"), "train")


def test_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.csv").write_text("text,label\ngreat film,positive\nawful,negative\n")
    rows = read_rows(tmp_path / "d.csv")
    assert rows == [(2, {"text": "great film", "label": "positive"}), (3, {"text": "awful", "label": "negative"})]
    pq.write_table(pa.table({"text": ["x", "y"], "label": ["negative", "bad"]}), tmp_path / "d.parquet")
    task = _task(tmp_path, [{"text": "a", "label": "positive"}])
    task.data.train = str(tmp_path / "d.parquet")
    with pytest.raises(MultituneError, match=r"d.parquet:2: field 'label' has label 'bad'"):
        load_split(task, "train")


def test_templates_render_and_are_sandboxed():
    assert render("Q: {{ q }}\nA:", {"q": "why?"}) == "Q: why?\nA:"
    assert template_fields("{{ a }} and {{ b | upper }}") == {"a", "b"}
    with pytest.raises(MultituneError, match="not allowed"):
        render("{{ x.__class__.__mro__[1].__subclasses__() }}", {"x": ""})
    with pytest.raises(MultituneError, match="template"):
        template_fields("{{ unclosed ")


def _encoder(model_dir, max_length=64, chat="auto"):
    tok = load_tokenizer(str(model_dir))
    return Encoder(tok, {"t": 0}, max_length, chat), tok


def test_loss_mask_covers_only_the_target(tiny_model_dir):
    enc, tok = _encoder(tiny_model_dir)
    row = enc.encode(Example("t", "Review: a fine film", "positive"))
    target = tok("positive", add_special_tokens=False).input_ids + [tok.eos_token_id]
    n_prompt = len(row.input_ids) - len(target)
    assert row.labels[:n_prompt] == [IGNORE] * n_prompt
    assert row.labels[n_prompt:] == target == row.input_ids[n_prompt:]
    assert tok.eos_token == "<|im_end|>"
    # the chat template wraps the prompt
    text = tok.decode(row.input_ids[:n_prompt])
    assert text.startswith("<|im_start|>user\nReview: a fine film") and text.endswith("<|im_start|>assistant\n")


def test_chat_template_off_and_absent(tiny_model_dir, tiny_model_dirs):
    enc, tok = _encoder(tiny_model_dir, chat="off")
    row = enc.encode(Example("t", "Review: x", "positive"))
    assert "<|im_start|>" not in tok.decode(row.input_ids)
    enc, tok = _encoder(tiny_model_dirs["gpt2"])
    assert not enc.use_chat
    with pytest.raises(MultituneError, match="has no chat template"):
        _encoder(tiny_model_dirs["gpt2"], chat="on")


def test_truncation_cuts_the_prompt_start_never_the_target(tiny_model_dir):
    enc, tok = _encoder(tiny_model_dir, max_length=40)
    long_prompt = "word " * 200 + "QUESTION END"
    row = enc.encode(Example("t", long_prompt, "positive"))
    assert row.truncated and len(row.input_ids) == 40
    text = tok.decode(row.input_ids)
    assert "QUESTION END" in text and text.startswith("<|im_start|>user\n")
    assert text.endswith("positive<|im_end|>")
    assert not enc.encode(Example("t", "short", "positive")).truncated


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # chat tokenizer (no bos) and plain (bos first)
@pytest.mark.parametrize("max_length", [8, 40])
def test_text_windows_predict_every_token_once(arch, max_length, tiny_model_dirs):
    enc, tok = _encoder(tiny_model_dirs[arch], max_length=max_length)
    text = "Glucose-6-phosphate dehydrogenase deficiency is common in malaria regions. " * 4
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    if arch == "gpt2":
        ids = [tok.bos_token_id] + ids
    windows = enc.windows(Example("t", text, None))
    assert len(windows) == -(-(len(ids) - 1) // (max_length - 1)) > 1
    assert all(len(w.input_ids) <= max_length and not w.truncated and w.task_id == 0 for w in windows)
    predicted = [t for w in windows for t in w.labels if t != IGNORE]
    assert predicted == ids[1:]  # each token after the first, once, in order
    for w, nxt in zip(windows, windows[1:], strict=False):
        assert w.labels[0] == IGNORE and nxt.input_ids[0] == w.input_ids[-1]  # one shared token
    short = tok("short", add_special_tokens=False).input_ids + [tok.eos_token_id]
    short = [tok.bos_token_id] + short if arch == "gpt2" else short
    assert [w.input_ids for w in enc.windows(Example("t", "short", None))] == [short]
    with pytest.raises(ValueError, match="Encoder.windows"):
        enc.encode(Example("t", text, None))


def test_collate_left_pads_and_keeps_positions(tiny_model_dir):
    enc, tok = _encoder(tiny_model_dir)
    a = enc.encode(Example("t", "a much longer prompt here", "positive"))
    b = enc.encode(Example("t", "hi", "negative"))
    batch = collate([a, b], tok.pad_token_id)
    width = len(a.input_ids)
    assert batch.input_ids.shape == (2, width)
    pad = width - len(b.input_ids)
    assert batch.attention_mask[1, :pad].sum() == 0 and batch.attention_mask[1, pad:].all()
    assert batch.position_ids[1, pad:].tolist() == list(range(len(b.input_ids)))
    assert (batch.labels[1, :pad] == IGNORE).all()
    assert torch.equal(batch.task_ids, torch.tensor([0, 0]))
