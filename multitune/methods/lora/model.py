"""LoRA, DoRA and rsLoRA through Hugging Face PEFT: this module translates our config and gives
the plain LoRA layers a fused forward (layer.py)."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from multitune.config import LoraMethod
from multitune.methods.lora.layer import fuse_lora_layers
from multitune.methods.targets import resolve_targets


def apply_lora(model: PreTrainedModel, cfg: LoraMethod) -> PeftModel:
    peft_cfg = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=resolve_targets(model, cfg.targets),
        use_rslora=cfg.rslora,
        use_dora=cfg.dora,
    )
    model = get_peft_model(model, peft_cfg)
    fuse_lora_layers(model)
    return model
