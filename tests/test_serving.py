"""`multitune chat` and `multitune serve` on a tiny trained run: answers equal `predict`'s, the
server speaks OpenAI's completions protocol to a real HTTP client on 127.0.0.1."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request

import pytest

from multitune.api import predict
from multitune.config import validate_config
from multitune.serving import Session, chat, serve
from multitune.training.loop import train


@pytest.fixture(scope="module")
def trained(run_config_module):
    cfg = validate_config(run_config_module(train={"max_steps": 2}, eval={"zero_shot": False}))
    train(cfg)
    return cfg.output


@pytest.fixture(scope="module")
def run_config_module(tiny_model_dir, tmp_path_factory):
    from conftest import task_rte, task_sst2

    out = tmp_path_factory.mktemp("serving") / "run"

    def make(**sections):
        raw = {
            "model": str(tiny_model_dir),
            "method": {"name": "lora", "rank": 4, "alpha": 8},
            "tasks": [task_sst2(), task_rte()],
            "train": {"batch_size": 4, "lr": 1e-3, "max_length": 96},
            "eval": {"max_new_tokens": 6, "batch_size": 8},
            "output": str(out),
        }
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
        return raw

    return make


def test_chat_answers_a_task_as_predict_does_and_explains_bad_input(trained):
    session = Session(trained)
    expected = predict(trained, "sst2", [{"text": "a fine film"}])[0]["prediction"]
    out = io.StringIO()
    chat(session, "sst2", ["a fine film\n", "\n", '{"premise": "x"}\n', "/exit\n", "never read\n"], out.write)
    lines = out.getvalue().splitlines()
    assert lines[0] == expected and expected in ("negative", "positive")
    assert lines[1] == "error: input: field 'text' is missing (task 'sst2')" and len(lines) == 2
    with pytest.raises(Exception, match="task 'rte' reads hypothesis, premise: send a JSON object"):
        session.answer("rte", "only one field")
    both = json.dumps({"premise": "It rains.", "hypothesis": "It is wet."})
    assert (
        session.answer("rte", both)["prediction"]
        == predict(trained, "rte", [{"premise": "It rains.", "hypothesis": "It is wet."}])[0]["prediction"]
    )


def test_free_text_streams_the_greedy_continuation(trained):
    session = Session(trained, max_new_tokens=5)
    pieces = list(session.stream("hello"))
    ids = session._chat_ids("hello")
    full = session.model.generate(
        input_ids=ids,
        attention_mask=ids.new_ones(ids.shape),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=session.tokenizer.pad_token_id,
    )
    assert (
        "".join(pieces).strip() == session.tokenizer.decode(full[0, ids.shape[1] :], skip_special_tokens=True).strip()
    )


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_server_speaks_openai_completions(trained):
    session = Session(trained)
    server = serve(session, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        with urllib.request.urlopen(f"{base}/models", timeout=30) as response:
            models = [m["id"] for m in json.loads(response.read())["data"]]
        assert models == ["run", "run:sst2", "run:rte"]
        code, body = _post(f"{base}/completions", {"model": "run:sst2", "prompt": "a fine film"})
        assert code == 200 and body["object"] == "text_completion" and body["model"] == "run:sst2"
        expected = predict(trained, "sst2", [{"text": "a fine film"}])[0]["prediction"]
        assert body["choices"][0]["text"] == expected and body["usage"]["total_tokens"] > 0
        code, body = _post(f"{base}/completions", {"model": "run", "prompt": "hello", "max_tokens": 3})
        assert code == 200 and isinstance(body["choices"][0]["text"], str)
        code, body = _post(f"{base}/completions", {"model": "run:mnli", "prompt": "x"})
        assert code == 404 and "unknown model 'run:mnli'" in body["error"]["message"]
        code, body = _post(f"{base}/completions", {"model": "run:rte", "prompt": "one field"})
        assert code == 400 and "send a JSON object" in body["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()
