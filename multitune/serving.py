"""Talking to a fine-tuned model: `multitune chat` (a prompt on the terminal, tokens streamed as
they are generated) and `multitune serve` (an OpenAI-compatible completions endpoint on
localhost, each task a model name `{run}:{task}`).

A task's input is its prompt template's fields: a plain text when the template reads one field
(`{{ text }}`), a JSON object of the fields otherwise (`{"premise": ..., "hypothesis": ...}`).
A classification task answers with the label the model scores highest (as `eval` does); the
other tasks, and free text without a task, are generated greedily. The server is the standard
library's threaded HTTP server: one model, one request generating at a time (a lock), meant for
trying a model on this machine, not for production traffic (export the adapter to vLLM, SGLang
or LoRAX for that).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from multitune import rundir
from multitune.data.sources import row_to_example
from multitune.errors import MultituneError
from multitune.evaluation.evaluator import predict as run_prediction
from multitune.methods.registry import method
from multitune.models.load import load_base, load_trained_model
from multitune.tasks.templates import template_fields


class Session:
    """A run's model, loaded once, answering texts for one of its tasks or as free text."""

    def __init__(self, run_dir: str | Path, base: bool = False, max_new_tokens: int = 128):
        self.run_dir = Path(run_dir)
        self.cfg = rundir.load_run_config(self.run_dir)
        self.model, self.tokenizer = load_base(self.cfg) if base else load_trained_model(self.run_dir, self.cfg)
        self.model.eval()
        self.encoder = rundir.make_encoder(self.cfg, self.tokenizer)
        self.how = None if base else method(self.cfg.method.name)
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()

    @property
    def needs_task(self) -> bool:
        """Task-gated experts and per-task adapters answer only as one of their tasks."""
        return self.how is not None and self.how.reads_task(self.cfg.method)

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name

    def row(self, task_name: str, text: str) -> dict:
        """The input of `task_name` from a plain text or a JSON object of its template's fields."""
        task = self.cfg.task(task_name)
        fields = sorted(template_fields(task.prompt))
        stripped = text.strip()
        if stripped.startswith("{"):
            try:
                row = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise MultituneError(f"input is not a JSON object: {e.msg} (column {e.colno})") from None
            if isinstance(row, dict):
                return row
        if len(fields) != 1:
            raise MultituneError(
                f"task '{task.name}' reads {', '.join(fields)}: send a JSON object of those fields, "
                f"e.g. {json.dumps(dict.fromkeys(fields, '...'))}"
            )
        return {fields[0]: text}

    def answer(self, task_name: str, text: str) -> dict:
        """One prediction for `task_name`: {"prediction": ...} (+ label scores for classification)."""
        task = self.cfg.task(task_name)
        example = row_to_example(task, self.row(task_name, text), "input", need_target=False)
        gate = self._gate(task_name)
        with self.lock:
            pred = run_prediction(
                self.model, self.encoder, task, [example], 1, self.max_new_tokens, gate[task_name] if gate else None
            )
        return pred[0]

    def stream(self, text: str, task_name: str | None = None, max_new_tokens: int | None = None) -> Iterator[str]:
        """Free text (no task): the reply to `text` as a chat turn where the tokenizer has a chat
        template, its continuation otherwise; pieces of text as they are generated."""
        if task_name is not None:
            yield str(self.answer(task_name, text)["prediction"])
            return
        if self.needs_task:
            raise MultituneError(
                f"a {self.how.name} model's layers read the task: name a task ({', '.join(self.cfg.task_names)})"
            )
        from transformers import TextIteratorStreamer

        ids = self._chat_ids(text)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": max_new_tokens or self.max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.tokenizer.pad_token_id,
            "streamer": streamer,
        }
        with self.lock:
            worker = threading.Thread(target=self._generate, kwargs=kwargs, daemon=True)
            worker.start()
            yield from streamer
            worker.join()

    def _generate(self, **kwargs) -> None:
        with torch.no_grad():
            self.model.generate(**kwargs)

    def _chat_ids(self, text: str) -> torch.Tensor:
        tok = self.tokenizer
        if self.cfg.chat_template != "off" and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tok(text)["input_ids"]
        return torch.tensor([list(ids)], device=next(self.model.parameters()).device)

    def _gate(self, task_name: str) -> dict[str, int] | None:
        return self.how.task_ids(self.model, [task_name], None) if self.how is not None else None


def chat(session: Session, task: str | None, lines, write) -> None:
    """Read lines, answer each: the terminal loop of `multitune chat` (also reads a pipe)."""
    for line in lines:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            return
        try:
            for piece in session.stream(text, task):
                write(piece)
        except MultituneError as e:
            write(f"error: {e}")
        write("\n")


def serve(session: Session, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An OpenAI-compatible server (GET /v1/models, POST /v1/completions); call serve_forever()
    on the result, or shutdown() from another thread."""
    models = {session.name: None, **{f"{session.name}:{t}": t for t in session.cfg.task_names}}
    if session.needs_task:
        del models[session.name]  # the layers read the task: no task-free model

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args) -> None:  # one line per request, on stderr
            print(f"[serve] {self.address_string()} {fmt % args}", flush=True)

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str) -> None:
            self._send(code, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/v1/models":
                return self._error(404, f"no route {self.path}: GET /v1/models, POST /v1/completions")
            data = [{"id": m, "object": "model", "owned_by": "multitune"} for m in models]
            self._send(200, {"object": "list", "data": data})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/completions":
                return self._error(404, f"no route {self.path}: POST /v1/completions")
            try:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
            except (ValueError, json.JSONDecodeError):
                return self._error(400, "the body is not JSON")
            name, prompt = body.get("model"), body.get("prompt")
            if name not in models:
                return self._error(404, f"unknown model {name!r}; this server has {', '.join(models)}")
            if not isinstance(prompt, str):
                return self._error(400, "'prompt' must be a string")
            try:
                text = "".join(session.stream(prompt, models[name], body.get("max_tokens")))
            except MultituneError as e:
                return self._error(400, str(e))
            usage = {"prompt_tokens": len(session.tokenizer(prompt)["input_ids"])}
            usage["completion_tokens"] = len(session.tokenizer(text)["input_ids"])
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            self._send(
                200,
                {
                    "id": f"cmpl-{time.time_ns()}",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": name,
                    "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                    "usage": usage,
                },
            )

    return ThreadingHTTPServer((host, port), Handler)
