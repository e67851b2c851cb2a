"""The fused adapter forwards (LoRA: methods/lora/layer.py, experts: methods/experts/layer.py)
compute what the plain ones compute: outputs and gradients, dropout on, Llama and GPT-2 (Conv1D)."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.layer import Linear

from multitune.config import validate_config
from multitune.methods import apply_method
from multitune.methods.experts import ExpertsLinear
from multitune.methods.lora.layer import FusedLoraLinear
from multitune.methods.task_context import task_context
from multitune.models.base import load_base_model

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _model(run_config, model_dir, method: dict):
    cfg = validate_config(run_config(model=str(model_dir), method=method))
    model = apply_method(load_base_model(cfg.model), cfg.method, cfg.tasks).train()
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero: give the update a value so that it is compared
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    return model


def _loss_and_grads(model, ids, tasks, seed: int = 7):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks either way: both draw them in the same order
    with task_context(tasks):
        logits = model(input_ids=ids).logits
    loss = logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def _assert_close(a, b):
    logits_a, grads_a = a
    logits_b, grads_b = b
    assert torch.allclose(logits_a, logits_b, atol=1e-5, rtol=1e-4)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        scale = grads_a[name].abs().max().clamp(min=1e-12)
        assert (grads_a[name] - grads_b[name]).abs().max() / scale < 1e-4, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_lora_equals_peft(run_config, tiny_model_dirs, arch):
    model = _model(run_config, tiny_model_dirs[arch], {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.2})
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    ids = torch.randint(5, 200, (3, 11))
    fused = _loss_and_grads(model, ids, [0, 1, 0])
    for m in layers:
        m.__class__ = Linear  # PEFT's own forward
    _assert_close(fused, _loss_and_grads(model, ids, [0, 1, 0]))


def test_fused_lora_leaves_other_cases_to_peft(run_config, tiny_model_dir):
    model = _model(run_config, tiny_model_dir, {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0, "dora": True})
    layer = next(m for m in model.modules() if isinstance(m, Linear))
    x = torch.randn(2, 5, layer.in_features)
    assert layer._plain_adapter(x, (), {}) is None  # DoRA: PEFT's variant forward
    model = _model(run_config, tiny_model_dir, {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0})
    layer = next(m for m in model.modules() if isinstance(m, Linear))
    assert layer._plain_adapter(x, (), {}) == "default"
    assert layer._plain_adapter(x.double(), (), {}) is None
    with model.disable_adapter():
        assert layer._plain_adapter(x, (), {}) is None
        base = layer.base_layer(x)
        assert torch.equal(layer(x), base)
    layer.merge()
    assert layer._plain_adapter(x, (), {}) is None
    layer.unmerge()
    with torch.no_grad():
        expected = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        assert torch.allclose(layer.eval()(x), expected, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["moe_lora", "cgc_lora"])
def test_fused_experts_equal_the_plain_forward(run_config, tiny_model_dirs, arch, method, monkeypatch):
    model = _model(run_config, tiny_model_dirs[arch], {"name": method, "rank": 8, "dropout": 0.2})
    ids = torch.randint(5, 200, (3, 11))
    layer = next(m for m in model.modules() if isinstance(m, ExpertsLinear))
    assert layer._fusable(torch.randn(3, 11, layer.in_features), (), {})
    fused = _loss_and_grads(model, ids, [0, 1, 0])
    monkeypatch.setattr(ExpertsLinear, "_fusable", lambda self, x, args, kwargs: False)
    _assert_close(fused, _loss_and_grads(model, ids, [0, 1, 0]))
