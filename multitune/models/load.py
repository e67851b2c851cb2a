"""Loading the models a run starts from and leaves behind: the base model (or an earlier run's
model merged into its weights, for a domain-adaptive stage), a run's fine-tuned model, and saving
one atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from multitune.config import RunConfig
from multitune.errors import MultituneError
from multitune.methods import saves_adapter
from multitune.methods.registry import METHODS, method
from multitune.models.base import load_base_model, load_tokenizer, resolve_model_dir
from multitune.rundir import CONFIG, MERGED, MODEL, load_run_config


def load_trained_model(run_dir: str | Path, cfg: RunConfig) -> tuple[torch.nn.Module, object]:
    """The fine-tuned model of a run and its tokenizer."""
    model_dir = Path(run_dir) / MODEL
    if not model_dir.is_dir():
        raise MultituneError(f"{run_dir} has no trained model yet ({MODEL}/ is missing)")
    tokenizer = load_tokenizer(str(model_dir))
    if saves_adapter(cfg.method.name):
        from peft import PeftModel

        import multitune.methods.adapter  # noqa: F401  (registers adapter with PEFT)
        import multitune.methods.experts  # noqa: F401  (registers moe_lora / cgc_lora with PEFT)
        import multitune.methods.shared_factor  # noqa: F401  (registers lora_experts / mtl_lora with PEFT)
        from multitune.methods.lora.layer import fuse_lora_layers

        if not (model_dir / "adapter_model.safetensors").is_file():
            raise MultituneError(
                f"{model_dir} holds no adapter_model.safetensors (a pickled adapter file is never loaded)"
            )
        base = load_base_model(base_model_path(cfg), cfg.cache_dir, dtype=base_dtype(cfg), load_in=cfg.load_in)
        try:
            model = PeftModel.from_pretrained(base, str(model_dir))
        except Exception as e:  # a damaged or foreign adapter: one line, not a traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MultituneError(f"could not load the adapter in {model_dir}: {first}") from None
        fuse_lora_layers(model)
    else:
        model = load_base_model(str(model_dir))
    return model.eval(), tokenizer


def base_dtype(cfg: RunConfig) -> torch.dtype:
    """The base weights' dtype: bf16 / fp16 under that mixed precision when the base stays frozen
    (adapters train on top; half the memory of float32 weights), float32 otherwise (full and
    partial fine-tuning keep float32 master weights, and a CPU computes in float32)."""
    if cfg.train.mixed_precision != "no" and saves_adapter(cfg.method.name):
        return torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float16
    return torch.float32


def load_base(cfg: RunConfig) -> tuple[torch.nn.Module, object]:
    path = base_model_path(cfg)
    model = load_base_model(path, cfg.cache_dir, dtype=base_dtype(cfg), load_in=cfg.load_in)
    if cfg.load_in is not None:  # QLoRA: norms in float32, inputs that carry gradients into the adapters
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    return model, load_tokenizer(path, cfg.cache_dir)


def base_model_path(cfg: RunConfig) -> str:
    """`cfg.model`; for an earlier run (`model: runs/dapt`, a domain-adaptive stage) its merged model."""
    path = Path(cfg.model)
    if (path / CONFIG).is_file() and (path / MODEL).is_dir():
        return str(merged_stage(path))
    return cfg.model


def merged_stage(run_dir: Path) -> Path:
    """The model of an earlier run with its update merged into the weights, written once to
    RUN/merged/. The next stage trains a fresh LoRA (or anything else) on top of it: merging costs
    nothing at inference and keeps the next stage's export an ordinary adapter of one base, where
    keeping the first LoRA frozen under the second would make every forward pay for both."""
    out = run_dir / MERGED
    if (out / "config.json").is_file():
        return out
    stage = load_run_config(run_dir)
    how = method(stage.method.name)
    if not how.merges or how.per_task:
        ok = ", ".join(m.name for m in METHODS.values() if m.merges and not m.per_task)
        raise MultituneError(
            f"{run_dir} was trained with {stage.method.name}; a run used as a base model must be {ok} "
            "(their update merges into the weights)"
        )
    model, tokenizer = load_trained_model(run_dir, stage)
    model = how.merge(model, None)
    tmp = run_dir / f".{MERGED}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    try:
        os.rename(tmp, out)
    except OSError:  # another process merged it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_trained_model(
    model: torch.nn.Module, tokenizer, run_dir: Path, cfg: RunConfig, state_dict: dict | None = None
) -> None:
    """Write model/ atomically (temporary folder, then rename); `state_dict`: the weights when
    the model's own are sharded (FSDP)."""
    final = run_dir / MODEL
    tmp = run_dir / f".{MODEL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), **({} if state_dict is None else {"state_dict": state_dict}))
    if saves_adapter(cfg.method.name):
        point_adapter_at_base(tmp, cfg)
    tokenizer.save_pretrained(str(tmp))
    old = run_dir / f".{MODEL}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def point_adapter_at_base(adapter_dir: Path, cfg: RunConfig) -> None:
    """Name the resolved local base model in adapter_config.json, so plain PEFT loads it offline."""
    conf_path = Path(adapter_dir) / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf["base_model_name_or_path"] = resolve_model_dir(base_model_path(cfg), cfg.cache_dir)
    conf_path.write_text(json.dumps(conf, indent=2))
