"""Shared fixtures: a tiny BPE tokenizer (plain and chat) and tiny random causal LMs.

Everything is built in-process from the data shipped in examples/data (no network, nothing outside
the repository), once per session.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VOCAB_SIZE = 600

# ChatML, as SmolLM2-Instruct uses it (without its default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _training_texts() -> list[str]:
    texts = []
    for task in ("sst2", "ag_news"):
        with open(DATA / task / "train.jsonl", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f if line.strip())
    return texts


def _train_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    return tok


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The data sets shipped with the repository (``examples/data``)."""
    return DATA


@pytest.fixture(scope="session")
def _bpe_json() -> str:
    return _train_bpe().to_str()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, _bpe_json) -> Path:
    """A ~600-token byte-level BPE tokenizer; ``<|endoftext|>`` is bos, eos and pad."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe_json),
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=None,
    )
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_chat_tokenizer_dir(tmp_path_factory, _bpe_json) -> Path:
    """The tiny tokenizer plus ``<|im_start|>``/``<|im_end|>`` (eos) and a ChatML template."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe_json),
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=None,
    )
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.eos_token = IM_END
    tok.chat_template = CHATML_TEMPLATE
    out = tmp_path_factory.mktemp("tiny_chat_tokenizer")
    tok.save_pretrained(out)
    return out


_ARCH = {
    "llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    "qwen2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, n_inner=128),
}


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer_dir, tiny_chat_tokenizer_dir) -> dict:
    """{"llama": dir, "qwen2": dir, "gpt2": dir}: tiny random models saved with their tokenizer."""
    chat_tok = PreTrainedTokenizerFast.from_pretrained(tiny_chat_tokenizer_dir)
    plain_tok = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    vocab = len(chat_tok)
    dirs = {}
    for arch, sizes in _ARCH.items():
        tok = plain_tok if arch == "gpt2" else chat_tok
        config = AutoConfig.for_model(
            arch,
            vocab_size=vocab,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **sizes,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        out = tmp_path_factory.mktemp(f"tiny_{arch}")
        model.save_pretrained(out)
        tok.save_pretrained(out)
        dirs[arch] = out
    return dirs


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> Path:
    """The tiny llama model dir (chat tokenizer included)."""
    return tiny_model_dirs["llama"]


def _task_spec(name: str, kind: str, prompt: str, n_train: int, n_eval: int, **extra) -> dict:
    """A task dict over examples/data/<name>, capped to small splits."""
    return {
        "name": name,
        "kind": kind,
        "data": {"train": str(DATA / name / "train.jsonl"), "dev": str(DATA / name / "dev.jsonl")},
        "prompt": prompt,
        "target": "{{ label }}",
        "max_train_examples": n_train,
        "max_eval_examples": n_eval,
        **extra,
    }


def task_sst2(n_train: int = 64, n_eval: int = 16) -> dict:
    labels = ["negative", "positive"]
    return _task_spec("sst2", "classification", "Review: {{ text }}\nSentiment?", n_train, n_eval, labels=labels)


def task_rte(n_train: int = 64, n_eval: int = 16) -> dict:
    prompt = "{{ premise }}\nHypothesis: {{ hypothesis }}\nEntailed?"
    return _task_spec("rte", "classification", prompt, n_train, n_eval, labels=["entailment", "not_entailment"])


def task_squad(n_train: int = 32, n_eval: int = 6) -> dict:
    prompt = "{{ context }}\nQuestion: {{ question }}"
    return _task_spec("squad", "extractive_qa", prompt, n_train, n_eval, target="{{ answer }}")


@pytest.fixture
def run_config(tiny_model_dir, tmp_path):
    """A function building a small, valid run config dict on the tiny llama model."""

    def make(**sections) -> dict:
        raw = {
            "model": str(tiny_model_dir),
            "method": {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.1},
            "tasks": [task_sst2(), task_rte()],
            "mixing": {"strategy": "temperature", "temperature": 2.0},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "max_length": 96, "log_every": 1, "seed": 0},
            "eval": {"max_new_tokens": 6, "batch_size": 8, "zero_shot": False},
            "output": str(tmp_path / "run"),
        }
        for key, value in sections.items():
            if key in ("train", "eval", "mixing") and isinstance(value, dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        return raw

    return make


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_yaml(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


_PLAIN_PEFT = """
import json, sys, torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
out = {}
for item in json.load(open(sys.argv[1])):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(item["base"]), item["adapter"]).eval()
    with torch.no_grad():
        out[item["key"]] = model(input_ids=torch.tensor(item["ids"])).logits.contiguous()
assert not [m for m in sys.modules if m.split(".")[0] == "multitune"], "multitune was imported"
save_file(out, sys.argv[2])
"""


def plain_peft_logits(jobs: list[dict], tmp_path: Path) -> dict[str, torch.Tensor]:
    """Logits of each exported adapter loaded by vanilla PEFT in a fresh process that never
    imports multitune: jobs are {"key", "base", "adapter", "ids"}."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    spec = tmp_path / "plain-peft.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", _PLAIN_PEFT, str(spec), str(tmp_path / "plain-peft.safetensors")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(tmp_path / "plain-peft.safetensors"))
