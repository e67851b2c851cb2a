"""The grouped-head SDPA attention (models/attention.py) against transformers' own "sdpa"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multitune.models import attention
from multitune.models.base import load_base_model


def _packed_batch(vocab: int) -> dict:
    """Two sequences: the first holds three rows, the second two; positions restart per row."""
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (2, 12))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    return {"input_ids": ids, "position_ids": positions, "use_cache": False}


def _outputs_and_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(**batch).logits
    (logits.square().mean()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("block", [64, 4, 5])  # 4 and 5: the 12-token sequences in query blocks
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # gpt2: as many key/value heads as query heads
def test_loaded_models_use_it_and_match_transformers_sdpa(tiny_model_dirs, arch, block, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    calls = []
    real = attention.blocked_attention
    monkeypatch.setattr(attention, "blocked_attention", lambda *a: calls.append(1) or real(*a))
    model = load_base_model(str(tiny_model_dirs[arch]))
    assert model.config._attn_implementation == attention.NAME
    for layout in ("packed", "padded"):
        batch = _packed_batch(model.config.vocab_size)
        if layout == "padded":
            batch = {"input_ids": batch["input_ids"], "attention_mask": torch.ones(2, 12, dtype=torch.long)}
            batch["attention_mask"][1, 9:] = 0
        ours, our_grads = _outputs_and_grads(model, batch)
        model.set_attn_implementation("sdpa")
        theirs, their_grads = _outputs_and_grads(model, batch)
        model.set_attn_implementation(attention.NAME)
        valid = slice(None) if layout == "packed" else (slice(None), slice(0, 9))
        torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)
        for a, b in zip(our_grads, their_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert len(calls) == (0 if block == 64 else 2 * model.config.num_hidden_layers)  # packed + padded


def test_grouped_heads_reach_the_kernel_uncopied(tiny_model_dir, monkeypatch):
    """The point of the function: key/value go to SDPA with their 2 heads, not repeated to 4."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    model = load_base_model(str(tiny_model_dir))
    with torch.no_grad():
        model(**_packed_batch(model.config.vocab_size))
    assert seen == [(4, 2, True)] * model.config.num_hidden_layers


def test_generation_matches_transformers_sdpa(tiny_model_dir):
    """Batched greedy generation (padded prompts, KV cache, one-token steps) gives the same tokens."""
    model = load_base_model(str(tiny_model_dir)).eval()
    torch.manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as generation pads
    mask[2, :2] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 8, "do_sample": False}
    kwargs.update(pad_token_id=model.config.pad_token_id, output_logits=True, return_dict_in_generate=True)
    ours = model.generate(**kwargs)
    model.set_attn_implementation("sdpa")
    theirs = model.generate(**kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits, strict=True):  # every step's logits, one-token steps included
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_other_attention_implementations_are_left_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not attention.use_grouped_sdpa(model)
    assert model.config._attn_implementation == "eager"


def _packed_mask(lengths: list[int]) -> torch.Tensor:
    """The additive (1, 1, S, S) mask of rows packed end to end: causal inside each row."""
    row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i = torch.arange(len(row))
    allowed = (row[:, None] == row[None, :]) & (i[:, None] >= i[None, :])
    return torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))[None, None]


def test_query_blocks_see_only_the_keys_their_rows_may_see():
    mask = _packed_mask([100, 100])
    blocks = [(0, 64, 0, 64), (64, 128, 0, 128), (128, 192, 100, 192), (192, 200, 100, 200)]
    assert attention._blocks(mask, 200) == blocks
    padded = _packed_mask([150])
    padded[..., 128:, :] = float("-inf")  # a block whose rows see nothing keeps every key, as unblocked
    assert attention._blocks(padded, 150)[-1] == (128, 150, 0, 150)


def test_the_blocks_of_a_mask_are_scanned_once_until_it_changes():
    mask = _packed_mask([100, 100])
    first = attention._blocks(mask, 200)
    assert attention._blocks(mask, 200) is first  # the same mask object: no new scan
    assert attention._blocks(_packed_mask([100, 100]), 200) is not first  # another mask: scanned
    mask[..., 128:, :100] = 0.0  # edited in place: the rows from 128 on now also see the first row
    assert attention._blocks(mask, 200)[2:] == [(128, 192, 0, 192), (192, 200, 0, 200)]
    with torch.inference_mode():  # inference tensors keep no version counter: always scanned
        frozen = _packed_mask([100, 100])
    assert attention._blocks(frozen, 200) == attention._blocks(_packed_mask([100, 100]), 200)


def test_blocked_attention_matches_sdpa_with_gradients():
    torch.manual_seed(0)
    mask = torch.cat([_packed_mask([90, 60, 50]), _packed_mask([200])])  # two packed sequences of 200
    q = torch.randn(2, 200, 4, 16).transpose(1, 2).requires_grad_()  # (B, H, S, D) as transformers passes it
    k = torch.randn(2, 200, 2, 16).transpose(1, 2).requires_grad_()  # grouped key/value heads
    v = torch.randn(2, 200, 2, 16).transpose(1, 2).requires_grad_()
    grad = torch.randn(2, 200, 4, 16)
    results = []
    for blocked in (False, True):
        if blocked:
            out = attention.blocked_attention(q, k, v, mask, 0.25)[0]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True).transpose(1, 2)
        out.backward(grad)
        results.append([out.detach(), q.grad, k.grad, v.grad])
        q.grad = k.grad = v.grad = None
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_blocked_attention_compiles_without_graph_breaks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    mask = _packed_mask([70, 80])
    q, k, v = (torch.randn(1, h, 150, 8).requires_grad_() for h in (4, 2, 2))
    compiled = torch.compile(lambda q, k, v: attention.blocked_attention(q, k, v, mask, 0.5)[0].sum(), fullgraph=True)
    compiled(q, k, v).backward()
    expected = q.grad.clone()
    q.grad = None
    attention.blocked_attention(q, k, v, mask, 0.5)[0].sum().backward()
    torch.testing.assert_close(q.grad, expected)
    assert not counters["graph_break"]
