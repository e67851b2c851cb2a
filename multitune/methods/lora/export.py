"""Write an update as the plain LoRA adapter that multi-LoRA servers load (vLLM, SGLang, LoRAX).

Those servers read `peft_type: LORA` adapters with `bias: none`, no `modules_to_save`, no DoRA
magnitude and (in some of them) no rsLoRA scaling, targeting modules by the base model's own
names, at a rank they were started with room for. `save_plain_lora` writes exactly that from
per-layer factors (A, B, scaling), whatever method produced them: rsLoRA's alpha / sqrt(r) is
folded into lora_alpha, and `max_rank` re-factorises a larger update to rank N by truncated SVD.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from multitune.errors import MultituneError

PREFIX = "base_model.model."  # PEFT's key prefix of a causal LM's adapter weights


def lora_factors(peft_model: torch.nn.Module, adapter: str = "default") -> dict[str, tuple]:
    """{module name: (A (r, d_in), B (d_out, r), scaling)} of a PEFT LoRA model's layers."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    out = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if module.use_dora.get(adapter, False):
                raise MultituneError(
                    "a DoRA update is not a plain LoRA (its magnitude vector rescales every weight column): "
                    "vLLM, SGLang and LoRAX load plain LoRA only; export it with --format merged"
                )
            a = module.lora_A[adapter].weight.detach()
            b = module.lora_B[adapter].weight.detach()
            out[name] = (a, b, float(module.scaling[adapter]))
    if not out:
        raise MultituneError("the model has no LoRA layers to export")
    return out


def truncate(a: torch.Tensor, b: torch.Tensor, scaling: float, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A', B', squared error) with B' A' the best rank-`rank` approximation of scaling * B A.

    The SVD is taken of the r x r core only (QR of B and of A^T first), so a 4096 x 4096 layer
    costs no more than its rank."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(scaling * rb @ ra.T)
    keep = s[:rank].sqrt()
    b_new = (qb @ u[:, :rank]) * keep
    a_new = keep.unsqueeze(1) * (vh[:rank] @ qa.T)
    return a_new.to(a.dtype), b_new.to(b.dtype), float((s[rank:] ** 2).sum())


def save_plain_lora(
    factors: dict[str, tuple],
    out: Path,
    base_model: str,
    dropout: float = 0.0,
    fan_in_fan_out: bool = False,
    max_rank: int | None = None,
) -> dict:
    """Write `factors` as a plain PEFT LoRA adapter in `out`; returns {"rank", "relative_error"}
    (the Frobenius norm of what truncation to `max_rank` dropped, over that of the whole update;
    0.0 without truncation)."""
    ranks = {a.shape[0] for a, _, _ in factors.values()}
    scalings = {round(s, 12) for _, _, s in factors.values()}
    if len(ranks) != 1 or len(scalings) != 1:  # never so for multitune's methods: one rank and scaling per update
        raise MultituneError(f"the update's layers differ in rank {sorted(ranks)} or scaling: not one plain LoRA")
    if max_rank is not None and max_rank < 1:
        raise MultituneError(f"--max-rank must be >= 1, got {max_rank}")
    rank = ranks.pop()
    truncating = max_rank is not None and max_rank < rank
    state, dropped, total = {}, 0.0, 0.0
    for name, (a, b, scaling) in factors.items():
        if truncating:
            total += float((scaling * b.double() @ a.double()).square().sum())
            a, b, err = truncate(a, b, scaling, max_rank)
            dropped += err
        state[f"{PREFIX}{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = b.detach().cpu().contiguous()
    if truncating:
        rank, alpha = max_rank, float(max_rank)  # the scaling is in the factors: lora_alpha / r = 1
    else:
        alpha = scalings.pop() * rank  # lora_alpha / r = the update's scaling (rsLoRA's folded in)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in factors}),
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_model,
        bias="none",
        use_rslora=False,
        use_dora=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"), {"format": "pt"})
    return {"rank": rank, "relative_error": math.sqrt(dropped / total) if truncating and total > 0 else 0.0}
