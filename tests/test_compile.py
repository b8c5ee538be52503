"""``torch.compile(fullgraph=True)``: zero graph breaks, no recompiles across batch sizes, parity, gradients, keep."""

from __future__ import annotations

import torch
import torch._dynamo
from timm.models.vision_transformer import VisionTransformer
from torch._dynamo.utils import counters

import evit_patch


def _small_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3).eval()


def test_fullgraph_inductor_matches_eager_without_graph_breaks_for_a_dynamic_batch():
    fast = evit_patch.apply(_small_vit(), layers=[1, 3], keep=0.7)
    first = torch.randn(4, 3, 64, 64)
    torch._dynamo.mark_dynamic(first, 0)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fast, fullgraph=True)
    with torch.no_grad():
        for x in (first, torch.randn(7, 3, 64, 64)):
            torch.testing.assert_close(compiled(x), fast(x), rtol=1e-4, atol=1e-4)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


def test_inductor_lowers_merging_for_a_changing_batch():
    """Merging's argmax, index_add and size bookkeeping through inductor, compiled once with a dynamic
    batch and called at other batch sizes. With mode="max-autotune-no-cudagraphs", the key-similarity
    matmul kept the batch a dynamic graph was compiled at (issue 23; checked by hand on DeiT-Tiny at
    flops=0.65, as its CPU autotuning takes minutes): merging computes it with einsum."""
    fast = evit_patch.apply(_small_vit(), layers=[1, 3], keep=0.7, method="merge")
    first = torch.randn(2, 3, 64, 64)
    torch._dynamo.mark_dynamic(first, 0)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fast, fullgraph=True)
    with torch.no_grad():
        for x in (first, torch.randn(5, 3, 64, 64), torch.randn(3, 3, 64, 64)):
            torch.testing.assert_close(compiled(x), fast(x), rtol=1e-4, atol=1e-4)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


def test_fullgraph_training_step_gradients_match_eager():
    fast = evit_patch.apply(_small_vit(), layers=[1, 3], keep=0.5)
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    compiled(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in fast.named_parameters()}
    fast.zero_grad()
    fast(x).square().mean().backward()
    for name, p in fast.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_changing_keep_is_picked_up_by_a_compiled_model():
    fast = evit_patch.apply(_small_vit(), layers=[1, 3], keep=0.7)
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    compiled = torch.compile(fast.forward_features, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert (
            compiled(x).shape[1] == fast.forward_features(x).shape[1] == 1 + 33 + 1
        )  # 64 -> ceil(44.8)=45 (+2) -> ceil(0.7*46)=33 (+2)
        evit_patch.set_keep(fast, 1.0)
        assert compiled(x).shape[1] == 65


def _compile_counted(model, **kwargs):
    """``torch.compile`` through a backend that counts the graphs dynamo hands it."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend(kwargs.pop("backend", "aot_eager"))
    return torch.compile(model, fullgraph=True, backend=counter, **kwargs), counter


def test_a_batch_marked_dynamic_compiles_once_for_every_batch_size():
    fast = evit_patch.apply(_small_vit(), layers=[1, 3], keep=0.7)
    compiled, counter = _compile_counted(fast)
    first = torch.randn(2, 3, 64, 64)
    torch._dynamo.mark_dynamic(first, 0)
    with torch.no_grad():
        with torch._dynamo.config.patch(error_on_recompile=True):
            for batch in (2, 3, 5, 8):
                x = first if batch == 2 else torch.randn(batch, 3, 64, 64)
                torch.testing.assert_close(compiled(x), fast(x), rtol=1e-5, atol=1e-5)
        assert counter.frame_count == 1
        # Dynamo never makes a size of 1 symbolic: batch 1 is its own graph, compiled once.
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(compiled(x), fast(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 2
    assert dict(counters["graph_break"]) == {}


def test_default_compile_recompiles_once_then_generalizes_the_batch():
    """Without ``mark_dynamic`` the first batch size is baked in; the second one makes it dynamic."""
    fast = evit_patch.apply(_small_vit(), layers=[1, 3], keep=0.7)
    compiled, counter = _compile_counted(fast)
    seen = []
    with torch.no_grad():
        for batch in (2, 3, 5, 8):
            x = torch.randn(batch, 3, 64, 64)
            torch.testing.assert_close(compiled(x), fast(x), rtol=1e-5, atol=1e-5)
            seen.append(counter.frame_count)
    assert seen == [1, 2, 2, 2]
