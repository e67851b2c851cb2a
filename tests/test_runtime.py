"""Process settings (threads, allocator) and layer compilation."""

import pytest
import torch

from multitune.models.base import load_base_model
from multitune.runtime import compile_layers, eager_layers, keep_freed_memory, use_cores


def test_use_cores_sets_the_threads():
    before = torch.get_num_threads()
    try:
        use_cores(1)
        assert torch.get_num_threads() == 1
        keep_freed_memory()  # idempotent: a second call is harmless
        x = torch.ones(4 << 20)  # 16 MiB: served from the heap now, and still correct
        assert float(x.sum()) == 4 << 20
    finally:
        torch.set_num_threads(before)


def test_compile_layers_compiles_each_decoder_layer(tiny_model_dirs):
    for arch, n_layers in (("llama", 2), ("gpt2", 2)):
        model = load_base_model(str(tiny_model_dirs[arch]))
        assert compile_layers(model) == n_layers == model.config.num_hidden_layers
        blocks = model.get_decoder().layers if arch == "llama" else model.transformer.h
        assert all(b._compiled_call_impl is not None for b in blocks)


def test_eager_layers_bypasses_the_compiled_blocks_and_restores_them(tiny_model_dirs):
    """Evaluation inside a compiled training run: nothing is traced, and training gets its
    compiled blocks back afterwards, also after an error."""
    from torch._dynamo.utils import counters

    model = load_base_model(str(tiny_model_dirs["llama"]))
    compile_layers(model)
    blocks = model.get_decoder().layers
    compiled = [b._compiled_call_impl for b in blocks]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch._dynamo.reset()
    counters.clear()
    with eager_layers(model), torch.no_grad():
        assert all(b._compiled_call_impl is None for b in blocks)
        eager = model(ids).logits
    assert not counters["frames"]
    assert [b._compiled_call_impl for b in blocks] == compiled
    with pytest.raises(RuntimeError, match="inside"):
        with eager_layers(model):
            raise RuntimeError("inside")
    assert [b._compiled_call_impl for b in blocks] == compiled
    with torch.no_grad():
        traced = model(ids).logits  # the compiled blocks again: dynamo traces them
    assert counters["frames"]
    assert torch.allclose(traced, eager, atol=1e-5)
