"""``explain``'s analytic counts: the paper's token arithmetic, and equality with FlopCounterMode."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import images, make_vit
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import evit_patch


def test_deit_small_paper_numbers():
    """EViT's DeiT-S keep 0.7 @3,6,9: MLP tokens 197x3, 140x3, 100x3, 72x3; 4.6 -> 3.0 GMACs."""
    fast = evit_patch.apply(timm.create_model("deit_small_patch16_224"), layers=[3, 6, 9], keep=0.7)
    report = evit_patch.explain(fast)
    assert [r.tokens_out for r in report.rows] == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    assert round(report.macs_original / 1e9, 3) == 4.599
    assert round(report.macs_patched / 1e9, 3) == 3.030
    text = str(report)
    assert "VisionTransformer (deit_small_patch16_224)" in text and "ideal speedup 1.52x" in text


def _counted_macs(model, x):
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize(
    ("name", "kwargs", "layers", "keep", "fuse", "size"),
    [
        ("deit_tiny_patch16_224", {}, [3, 6, 9], 0.7, True, None),
        ("deit_tiny_patch16_224", {}, [0, 1, 2], [0.5, 0.3, 0.9], False, None),
        ("deit_tiny_distilled_patch16_224", {}, [2, 8], 0.6, True, None),
        ("deit_tiny_patch16_224", {"dynamic_img_size": True}, [3, 6, 9], 0.7, True, 288),
    ],
)
def test_analytic_macs_equal_counted_macs(name, kwargs, layers, keep, fuse, size):
    model = make_vit(name, dtype=torch.float32, **kwargs)
    fast = evit_patch.apply(model, layers=layers, keep=keep, fuse=fuse)
    report = evit_patch.explain(fast, img_size=size)
    x = images(1, size or 224, dtype=torch.float32)
    assert report.macs_patched == _counted_macs(fast, x)
    assert report.macs_original == _counted_macs(model, x)


def test_manual_attention_macs_equal_counted_macs():
    model = make_vit(dtype=torch.float32)
    for block in model.blocks:
        block.attn.fused_attn = False
    fast = evit_patch.apply(model, layers=[3, 6, 9], keep=0.7)
    assert evit_patch.explain(fast).macs_patched == _counted_macs(fast, images(1, dtype=torch.float32))


def test_explain_refuses_unpatched_models():
    with pytest.raises(evit_patch.InvalidPlanError, match=r"^explain: VisionTransformer .* is not an evit_patch model"):
        evit_patch.explain(make_vit())
