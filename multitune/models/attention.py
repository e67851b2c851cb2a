"""Scaled-dot-product attention that gives grouped key/value heads to a CPU kernel as they are.

transformers' "sdpa" attention copies each key/value head num_heads / num_kv_heads times
(`repeat_kv`) whenever it passes a mask, which packed and padded batches always need, because
CUDA's kernels fall back to the slow math path for grouped heads with a mask. PyTorch's CPU
flash-attention kernel takes grouped heads with a mask (`enable_gqa=True`), so on a CPU the copy,
and the sum over copies its backward adds, is pure cost: forward + backward of SmolLM2-135M (9
query heads, 3 key/value heads) on the training bench's four packed batches, 1.03x, 0.99x and
1.05x in three runs of `bench/parts.py --part attention` (a few percent, near that machine's
noise). Everything else (CUDA, decoding steps, position bias,
soft-capping) is transformers' own function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "multitune_sdpa"


def grouped_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    grouped = key.shape[1] != query.shape[1]
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if query.device.type != "cpu" or attention_mask is None or query.shape[2] == 1 or not grouped or not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_grouped_sdpa(model: PreTrainedModel) -> bool:
    """Switch a model that runs transformers' "sdpa" attention to this one; True if switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
