"""``torch.compile(fullgraph=True)``: zero graph breaks, parity with eager, gradients, keep changes."""

from __future__ import annotations

import torch
import torch._dynamo
from timm.models.vision_transformer import VisionTransformer
from torch._dynamo.utils import counters

import evit_patch


def _small_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=3).eval()


def test_fullgraph_inductor_matches_eager_without_graph_breaks():
    fast = evit_patch.apply(_small_vit(), layers=[1, 3], keep=0.7)
    x = torch.randn(4, 3, 64, 64)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fast, fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out, fast(x), rtol=1e-4, atol=1e-4)
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
