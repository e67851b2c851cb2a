"""WordDropout: nn.Dropout's distribution and scaling from a cheaper mask, swapped in by apply_method."""

import pytest
import torch

from multitune.config import validate_config
from multitune.methods import apply_method
from multitune.methods.dropout import WordDropout
from multitune.models.base import load_base_model


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_and_scaling_match_nn_dropout(p):
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # no zeros of its own
    y = WordDropout(p).train()(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(p, abs=0.002)  # 1e6 draws: 4 standard deviations at p = 0.5
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p))
    ref = torch.nn.Dropout(p).train()(x)
    assert (ref == 0).float().mean().item() == pytest.approx(dropped, abs=0.003)
    assert y.mean().item() == pytest.approx(x.mean().item(), rel=0.01)  # expectation preserved


def test_masks_are_independent_and_reproducible():
    x = torch.ones(64, 4096)
    layer = WordDropout(0.5).train()
    torch.manual_seed(3)
    a, b = layer(x), layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), a) and not torch.equal(a, b)
    # neighbouring elements come from different 16-bit slices of one word: no correlation
    flat = (a.flatten() != 0).float()
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()
    assert abs(corr) < 0.02


def test_gradient_is_the_mask_times_the_scale_and_eval_is_identity():
    x = torch.ones(32, 256, requires_grad=True)
    layer = WordDropout(0.25).train()
    y = layer(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / 0.75)
    layer.eval()
    assert layer(x) is x
    assert WordDropout(0.0).train()(x) is x


def test_apply_method_swaps_every_dropout(run_config, tiny_model_dirs):
    for arch in ("llama", "gpt2"):
        for method in ({"name": "lora", "rank": 4, "dropout": 0.1}, {"name": "moe_lora", "rank": 4, "dropout": 0.1}):
            cfg = validate_config(run_config(model=str(tiny_model_dirs[arch]), method=method))
            model = apply_method(load_base_model(cfg.model), cfg.method, cfg.tasks)
            kinds = [type(m) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
            assert kinds and all(k is WordDropout for k in kinds)
            adapter = [m for n, m in model.named_modules() if type(m) is WordDropout and "default" in n.split(".")]
            assert adapter and all(m.p == 0.1 for m in adapter)  # the adapters' own dropout, p kept


def test_masked_is_forward_before_the_scale():
    x = torch.randn(16, 300)
    layer = WordDropout(0.2).train()
    torch.manual_seed(5)
    full = layer(x)
    torch.manual_seed(5)
    kept, scale = layer.masked(x)
    assert scale == pytest.approx(1 / 0.8)
    assert torch.equal(kept == 0, full == 0)  # the same mask
    assert torch.allclose(kept * scale, full, atol=1e-6, rtol=1e-6)
    layer.eval()
    kept, scale = layer.masked(x)
    assert kept is x and scale == 1.0


def test_odd_sizes_and_seeded_by_torch():
    layer = WordDropout(0.3).train()
    x = torch.ones(7, 13)  # 91 elements: the last word only partly used
    torch.manual_seed(11)
    a = layer(x)
    torch.manual_seed(11)
    assert torch.equal(layer(x), a) and a.shape == (7, 13)
    torch.manual_seed(12)
    assert not torch.equal(layer(torch.ones(64, 64)), layer(torch.ones(64, 64)))
    torch.manual_seed(11)
    b = layer(torch.ones(64, 64))
    torch.manual_seed(12)
    assert not torch.equal(layer(torch.ones(64, 64)), b)  # another torch seed, another mask


def test_compiled_masks_stay_in_the_graph_and_independent():
    """train.compile: the mask is one operator of the graph (no break at the numpy draw), and the
    masks of q, k and v (one input, three dropouts) are drawn separately, not merged into one."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    first, second = WordDropout(0.5).train(), WordDropout(0.5).train()
    x = torch.ones(256, 1024, requires_grad=True)
    compiled = torch.compile(lambda x: first(x) + second(x), dynamic=True)
    torch.manual_seed(0)
    y = compiled(x)
    assert not counters["graph_break"]
    assert set(y.unique().tolist()) == {0.0, 2.0, 4.0}
    assert (y == 0).float().mean().item() == pytest.approx(0.25, abs=0.005)  # both dropped: p^2, not p
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # x = 1: the gradient is the sum of the scaled masks, as y is
    torch.manual_seed(0)
    assert torch.equal(compiled(x), y)  # still fixed by torch's seed
