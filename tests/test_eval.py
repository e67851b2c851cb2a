"""Evaluation and prediction: batched label scoring, generation, perplexity, the eval/predict commands."""

import json

import pytest
import torch
from conftest import DATA, task_rte, task_squad, write_yaml

from multitune import rundir
from multitune.cli import main
from multitune.config import validate_config
from multitune.data.collate import collate
from multitune.data.encode import IGNORE, Encoded
from multitune.data.sources import Example, load_split
from multitune.evaluation.evaluator import evaluate, length_batches, predict, score
from multitune.models.base import load_base_model, load_tokenizer
from multitune.models.forward import target_logprobs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_label_scores_equal_one_forward_per_label(arch, tiny_model_dirs, run_config):
    cfg = validate_config(run_config(model=str(tiny_model_dirs[arch])))
    model = load_base_model(cfg.model).eval()
    enc = rundir.make_encoder(cfg, load_tokenizer(cfg.model))
    task = cfg.task("rte")
    rows = load_split(task, "dev", limit=7)
    preds = predict(model, enc, task, rows, batch_size=3)
    width = max(len(enc.target_ids(label)) for label in task.labels)
    for ex, pred in zip(rows, preds, strict=True):
        prompt, _ = enc.prompt_ids(ex.prompt, reserve=width)
        for label in task.labels:
            ids = enc.target_ids(label)
            batch = collate([Encoded(prompt + ids, [IGNORE] * len(prompt) + ids, 0, False)], enc.tok.pad_token_id)
            with torch.no_grad():
                naive = target_logprobs(model, batch)[0].sum().item()
            assert pred["scores"][label] == pytest.approx(naive, abs=1e-4)
        assert pred["prediction"] == max(pred["scores"], key=pred["scores"].get)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_shared_prompt_prefix_is_computed_once_and_changes_nothing(arch, tiny_model_dirs, run_config, monkeypatch):
    from multitune.evaluation import evaluator as runner

    lead = "Read the premise and the hypothesis below with care, then answer.\nPremise: "
    rte = {**task_rte(), "prompt": lead + "{{ premise }}\nHypothesis: {{ hypothesis }}"}
    squad = {**task_squad(2, 5), "prompt": lead + "{{ context }}\nQuestion: {{ question }}"}
    raw = run_config(model=str(tiny_model_dirs[arch]), tasks=[rte, squad], train={"max_length": 480})
    cfg = validate_config(raw)
    model = load_base_model(cfg.model).eval()
    enc = rundir.make_encoder(cfg, load_tokenizer(cfg.model))
    rows = {t.name: load_split(t, "dev", limit=5) for t in cfg.tasks}
    prompts = [enc.prompt_ids(ex.prompt, reserve=4)[0] for ex in rows["rte"]]
    with torch.no_grad():
        shared = runner._SharedPrefix(model, prompts)
    assert len(shared.tokens) >= 10  # the template's head and the lead-in
    assert all(p[: len(shared.tokens)] == shared.tokens for p in prompts)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)
    with_prefix = {t.name: predict(model, enc, t, rows[t.name], batch_size=2, max_new_tokens=6) for t in cfg.tasks}
    hook.remove()
    assert calls[0] == (1, len(shared.tokens))  # the prefix runs once, alone, before the batches
    assert calls[1][1] == max(map(len, prompts)) - len(shared.tokens)  # the longest batch starts after it
    monkeypatch.setattr(runner._SharedPrefix, "MIN_PREFIX", 10**9)
    without = {t.name: predict(model, enc, t, rows[t.name], batch_size=2, max_new_tokens=6) for t in cfg.tasks}
    assert [p["prediction"] for p in with_prefix["squad"]] == [p["prediction"] for p in without["squad"]]
    for a, b in zip(with_prefix["rte"], without["rte"], strict=True):
        assert a["prediction"] == b["prediction"]
        for label, value in a["scores"].items():
            assert value == pytest.approx(b["scores"][label], abs=1e-4)


def _partitions(items):
    if not items:
        yield []
        return
    head, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[head], *part]
        for k in range(len(part)):
            yield [*part[:k], [head, *part[k]], *part[k + 1 :]]


def test_length_batches_pad_least_of_all_groupings():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 60, (7,), generator=gen).tolist()
        for max_rows, per_batch, max_cells in ((3, 0, None), (3, 10, None), (7, 25, None), (7, 5, 90)):
            batches = length_batches(lengths, max_rows, per_batch, max_cells)

            def fits(group, max_rows=max_rows, max_cells=max_cells, lengths=lengths):
                cells = len(group) * max(lengths[i] for i in group)
                return len(group) <= max_rows and (max_cells is None or len(group) == 1 or cells <= max_cells)

            def cost(groups, per_batch=per_batch, lengths=lengths):
                return sum(len(g) * max(lengths[i] for i in g) + per_batch for g in groups)

            assert sorted(i for b in batches for i in b) == list(range(7))  # every row once
            assert all(fits(b) for b in batches)
            assert batches[0][0] == max(range(7), key=lambda i: lengths[i])  # longest batch first
            assert cost(batches) == min(cost(g) for g in _partitions(list(range(7))) if all(map(fits, g)))
    assert length_batches([5, 9, 7], 16) == [[1, 2, 0]]  # few rows: one batch, longest first
    assert length_batches([50, 3, 4], 16, max_cells=12) == [[0], [2, 1]]  # a row longer than the budget: alone
    assert length_batches([], 4) == []


def test_score_uses_the_right_metrics():
    from multitune.config import TaskConfig

    cls = TaskConfig.model_validate(
        {
            "name": "c",
            "kind": "classification",
            "data": {"dev": "x"},
            "prompt": "p",
            "target": "t",
            "labels": ["a", "b"],
        }
    )
    exs = [Example("c", "p", g) for g in ("a", "a", "b", "b")]
    got = score(cls, exs, [{"prediction": p} for p in ("a", "b", "b", "b")])
    # accuracy 3/4; F1(a) = 2*1*0.5/1.5 = 2/3, F1(b) = 2*(2/3)*1/(5/3) = 0.8 -> macro 73.33
    assert got == {"accuracy": 75.0, "macro_f1": pytest.approx(73.333, abs=1e-3)}
    qa = TaskConfig.model_validate(
        {"name": "q", "kind": "extractive_qa", "data": {"dev": "x"}, "prompt": "p", "target": "t"}
    )
    exs = [Example("q", "p", "Paris", ["Paris", "in Paris"]), Example("q", "p", "blue", ["blue"])]
    got = score(qa, exs, [{"prediction": "in paris"}, {"prediction": "red"}])
    assert got == {"exact_match": 50.0, "f1": 50.0}
    text = TaskConfig.model_validate({"name": "x", "kind": "text", "data": {"dev": "x"}})
    import math

    assert score(text, [], [{"nll": 4.0, "tokens": 2}, {"nll": 2.0, "tokens": 1}])["perplexity"] == pytest.approx(
        math.exp(2.0)
    )


def test_text_perplexity_matches_the_model_loss(tiny_model_dir, run_config):
    raw = run_config(
        tasks=[
            {
                "name": "pub",
                "kind": "text",
                "data": {"dev": str(DATA / "pubmed_abstracts/dev.jsonl")},
                "max_eval_examples": 3,
            }
        ]
    )
    cfg = validate_config(raw)
    model = load_base_model(cfg.model).eval()
    tok = load_tokenizer(cfg.model)
    enc = rundir.make_encoder(cfg, tok)
    rows = rundir.load_examples(cfg, "dev")["pub"]
    result = evaluate(model, enc, cfg, {"pub": rows})
    nll = count = 0
    windows = [w.input_ids for ex in rows for w in enc.windows(ex)]
    assert len(windows) > len(rows)  # abstracts are longer than max_length 96: several windows each
    for ids in windows:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
        nll += out.loss.item() * (len(ids) - 1)
        count += len(ids) - 1
    full = [tok(ex.prompt, add_special_tokens=False).input_ids + [tok.eos_token_id] for ex in rows]
    assert count == sum(len(ids) - 1 for ids in full)  # every token after the first, once
    assert result["tasks"]["pub"]["perplexity"] == pytest.approx(float(torch.exp(torch.tensor(nll / count))), rel=1e-4)
    assert result["mean"] is None  # perplexity stays out of the mean


def test_generation_predictions_are_strings(run_config):
    cfg = validate_config(run_config(tasks=[task_squad(4, 3)]))
    model = load_base_model(cfg.model).eval()
    enc = rundir.make_encoder(cfg, load_tokenizer(cfg.model))
    rows = rundir.load_examples(cfg, "dev")["squad"]
    preds = predict(model, enc, cfg.task("squad"), rows, batch_size=2, max_new_tokens=5)
    assert len(preds) == 3 and all(isinstance(p["prediction"], str) for p in preds)
    # batched greedy decoding equals decoding each row alone
    alone = [predict(model, enc, cfg.task("squad"), [r], batch_size=1, max_new_tokens=5)[0] for r in rows]
    assert alone == preds


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_prompts_of_a_decoding_batch_run_in_length_groups_and_decode_as_alone(arch, tiny_model_dirs, run_config):
    from multitune.evaluation import evaluator as runner

    squad = {
        **task_squad(2, 8),
        "prompt": "Answer from the text below, with a span of it.\n{{ context }}\nQ: {{ question }}",
    }
    raw = run_config(model=str(tiny_model_dirs[arch]), tasks=[squad], train={"max_length": 1024})
    cfg = validate_config(raw)
    model = load_base_model(cfg.model).eval()
    enc = rundir.make_encoder(cfg, load_tokenizer(cfg.model))
    task, rows = cfg.task("squad"), load_split(cfg.task("squad"), "dev", limit=8)
    prompts = [enc.prompt_ids(ex.prompt, reserve=4)[0] for ex in rows]
    assert len(length_batches([len(p) for p in prompts], 8)) >= 2  # the prompt pass is split
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)
    together = predict(model, enc, task, rows, batch_size=8, max_new_tokens=4)
    hook.remove()
    prompt_passes = [shape for shape in calls if shape[1] > 1]
    with torch.no_grad():
        shared = runner._SharedPrefix(model, prompts)
    assert prompt_passes[0] == (1, len(shared.tokens)) and len(shared.tokens) >= 10  # the shared prefix once
    assert len(prompt_passes) >= 3 and sum(shape[0] for shape in prompt_passes[1:]) == 8  # then the groups
    assert calls[len(prompt_passes)][0] == 8  # all rows decode together
    alone = [predict(model, enc, task, [r], batch_size=1, max_new_tokens=4)[0] for r in rows]
    assert together == alone
    with torch.no_grad():
        ids, mask, cache = runner._prefill(model, shared, prompts, enc.tok.pad_token_id)
        assert cache.get_seq_length() == ids.shape[1] - 1 == mask.shape[1] - 1
        positions = (mask.cumsum(-1) - 1)[:, -1:]
        step = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]
        alone = torch.cat([model(input_ids=torch.tensor([p])).logits[:, -1] for p in prompts])
    for i, p in enumerate(prompts):  # each row: left padding, then its prompt (the prefix's padding inside)
        assert ids[i][mask[i].bool()].tolist() == p
    assert (alone[1:] - alone[:1]).abs().amax() > 1e-2  # rows differ: the next check can tell them apart
    torch.testing.assert_close(step, alone, atol=1e-4, rtol=1e-4)  # the stacked cache is each row's own


def test_eval_and_predict_commands(run_config, tmp_path, capsys):
    raw = run_config(train={"max_steps": 2}, eval={"zero_shot": True})
    cfg_path = write_yaml(tmp_path / "run.yaml", raw)
    assert main(["train", str(cfg_path)]) == 0
    run = tmp_path / "run"
    before = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| task | metric | n | zero-shot | fine-tuned | Δ |" in out
    after = json.loads((run / "results.json").read_text())
    assert after["fine_tuned"]["tasks"] == before["fine_tuned"]["tasks"]
    assert after["zero_shot"] == before["zero_shot"]
    # zero-shot from the YAML alone, with an override
    assert main(["eval", str(cfg_path), "eval.max_examples=4", "tasks.rte.max_eval_examples=4"]) == 0
    out = capsys.readouterr().out
    assert "| task | metric | n | zero-shot |" in out and "fine-tuned" not in out
    # predict: JSONL in, JSONL out, order kept
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "a wonderful film", "id": 1}\n{"text": "dreadful", "id": 2}\n')
    outp = tmp_path / "out.jsonl"
    assert main(["predict", str(run), "--task", "sst2", "--input", str(inp), "--output", str(outp)]) == 0
    rows = [json.loads(x) for x in outp.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2]
    assert all(
        r["prediction"] in ("negative", "positive") and set(r["scores"]) == {"negative", "positive"} for r in rows
    )
    # bad input: unknown task, missing field
    assert main(["predict", str(run), "--task", "mnli", "--input", str(inp)]) == 2
    assert "unknown task 'mnli'; this run has: sst2, rte" in capsys.readouterr().err
    inp.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    assert main(["predict", str(run), "--task", "sst2", "--input", str(inp)]) == 2
    assert "in.jsonl:2: field 'text' is missing" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
