"""LoRA, DoRA and rsLoRA through Hugging Face PEFT: this module only translates our config."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from multitune.config import LoraMethod
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
    return get_peft_model(model, peft_cfg)
