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

Long masked sequences go to the kernel in blocks of `QUERY_BLOCK` queries, each with only the
keys its mask lets it see (`blocked_attention`). The CPU kernel works through keys in blocks of
512, so for the training bench's packed sequences of 300-450 tokens it computed every score of
the S x S square, the causal upper half and the scores between rows packed together included
(about 70% of them masked away). A block of queries sees keys from the first one any of its
rows may attend to (the start of its first packed row) up to its own end, so the blocks skip the
upper triangle and most of the other rows. Same outputs and gradients to float rounding (tested).
Models with as many key/value heads as query heads (GPT-2) take the same path. Because the
blocks skip the other rows, a long sequence of packed rows costs no more attention per token
than short ones: training packs a step's rows into one sequence of up to 2048 tokens on a CPU
(training/loop.py `_pack_length`).
Forward + backward of the bench's four packed batches: attention alone on random q/k/v, 262 ->
235 ms per layer (medians of 6, scratch timing); the whole model, 1.05x and 1.10x in two runs
(`python bench/parts.py --part blocks`).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

from multitune._compat import cpu_flash_attention, sdpa_pieces, tensor_version

sdpa_attention_forward, AttentionMaskInterface, sdpa_mask = sdpa_pieces()
flash_forward, flash_backward = cpu_flash_attention()

NAME = "multitune_sdpa"
QUERY_BLOCK = 64  # queries per kernel call; on the bench's batches 64 and 128 measured alike, 48 slower


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
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if query.device.type != "cpu" or attention_mask is None or query.shape[2] == 1 or not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask.ndim == 4 and attention_mask.shape[-1] != key.shape[-2]:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]  # a static cache's mask is longer than the keys
    blocked = query.dtype == attention_mask.dtype == torch.float32 and not (dropout and module.training)
    if blocked and query.shape[2] > QUERY_BLOCK:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return blocked_attention(query, key, value, attention_mask, scale)[0], None
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _blocks(mask: torch.Tensor, length: int) -> list[tuple[int, int, int, int]]:
    """(first query, end, first key, end key) per block of `QUERY_BLOCK` queries: the keys any
    query of the block may see in any sequence of the batch. A block that may see nothing (rows
    of padding only) keeps all keys, as the unblocked call would.

    The scan reads the whole mask; every layer's forward and backward get the same mask object,
    so the last scan is kept (for that tensor object at that version): one scan per step instead
    of one per layer call, which on one 1,541-token sequence cost 3.8 ms, 3% of a step, x 60."""
    global _last_scan
    version = None if mask.is_inference() else tensor_version(mask)  # inference tensors keep no version
    seen = _last_scan
    key = (version, length, QUERY_BLOCK)
    if version is not None and seen is not None and seen[0]() is mask and seen[1] == key:
        return seen[2]
    allowed = mask > float("-inf")  # the additive mask: only float masks reach the blocks
    blocks = []
    for start in range(0, length, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, length)
        keys = allowed[..., start:end, :].flatten(0, -2).any(0).nonzero()
        first, last = (int(keys[0]), int(keys[-1]) + 1) if len(keys) else (0, length)
        blocks.append((start, end, first, last))
    _last_scan = (weakref.ref(mask), key, blocks)
    return blocks


_last_scan: tuple | None = None  # (weak reference to the mask, (version, length, QUERY_BLOCK), blocks)


def additive_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' SDPA mask as the CPU kernel takes it, 0 where allowed and -inf elsewhere, in
    float32: built once per forward instead of converted from bool in every layer's call."""
    mask = sdpa_mask(*args, **kwargs)
    if mask is None or mask.dtype != torch.bool or mask.device.type != "cpu":
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


@torch.library.custom_op("multitune::blocked_attention", mutates_args=())
def blocked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention of (B, H, S, D) queries over grouped (B, KV, S, D) keys/values, query
    block by query block: (output as (B, S, H, D), the log-sum-exp (B, H, S) backward needs).
    An operator of its own so that `torch.compile` keeps it whole: the blocks depend on the
    mask's values, which a compiled graph cannot branch on."""
    batch, heads, length, dim = query.shape
    out = query.new_empty(batch, length, heads, dim)
    lse = query.new_empty(batch, heads, length)
    for start, end, first, last in _blocks(mask, length):
        block_out, block_lse = flash_forward(
            query[:, :, start:end],
            key[:, :, first:last],
            value[:, :, first:last],
            attn_mask=mask[..., start:end, first:last],
            scale=scale,
        )
        out[:, start:end].copy_(block_out.transpose(1, 2))
        lse[:, :, start:end].copy_(block_lse)
    return out, lse


@blocked_attention.register_fake
def _(query, key, value, mask, scale):
    batch, heads, length, dim = query.shape
    return query.new_empty(batch, length, heads, dim), query.new_empty(batch, heads, length)


@torch.library.custom_op("multitune::blocked_attention_backward", mutates_args=())
def blocked_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of query, key and value, block by block as the forward: a key's gradient sums
    over the blocks that saw it."""
    grad_query = torch.empty_like(query)
    grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)
    for start, end, first, last in _blocks(mask, query.shape[2]):
        gq, gk, gv = flash_backward(
            grad_out[:, start:end].transpose(1, 2),
            query[:, :, start:end],
            key[:, :, first:last],
            value[:, :, first:last],
            out[:, start:end].transpose(1, 2),
            lse[:, :, start:end],
            0.0,
            False,
            attn_mask=mask[..., start:end, first:last],
            scale=scale,
        )
        grad_query[:, :, start:end].copy_(gq)
        grad_key[:, :, first:last] += gk
        grad_value[:, :, first:last] += gv
    return grad_query, grad_key, grad_value


@blocked_attention_backward.register_fake
def _(grad_out, query, key, value, mask, out, lse, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _save(ctx, inputs, output) -> None:
    query, key, value, mask, scale = inputs
    ctx.save_for_backward(query, key, value, mask, *output)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, mask, out, lse = ctx.saved_tensors
    grads = blocked_attention_backward(grad_out.contiguous(), query, key, value, mask, out, lse, ctx.scale)
    return *grads, None, None


blocked_attention.register_autograd(_backward, setup_context=_save)


AttentionInterface.register(NAME, grouped_sdpa_forward)
AttentionMaskInterface.register(NAME, additive_mask)


def skips_other_rows(model: PreTrainedModel, device: torch.device) -> bool:
    """Whether attention over rows packed into one sequence runs in query blocks that skip the
    other rows' keys: then a longer packed sequence costs no more attention per token."""
    return device.type == "cpu" and getattr(model.config, "_attn_implementation", None) == NAME


def use_grouped_sdpa(model: PreTrainedModel) -> bool:
    """Switch a model that runs transformers' "sdpa" attention to this one; True if switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
