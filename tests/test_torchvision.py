"""torchvision ``VisionTransformer``: attention re-expressed with SDPA on the same parameters."""

from __future__ import annotations

import pytest
import torch
from cases import small_torchvision
from conftest import images
from reference import assert_patches_like_timm, reference_forward_torchvision
from torchvision.models import vit_b_16
from torchvision.models.vision_transformer import VisionTransformer

import evit_patch


def test_without_fusion_matches_reference():
    """The family table runs the reference with fusion, for EViT and merging."""
    model, x = small_torchvision(), images(3, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=[0.6, 0.5], fuse=False)
    with torch.no_grad():
        got, want = fast(x), reference_forward_torchvision(model, x, [1, 2], [0.6, 0.5], fuse=False)
    assert got.abs().max() > 0.1  # the head is not zero
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_keep_one_matches_original_to_float64_rounding():
    """Not bitwise: nn.MultiheadAttention's fused kernel and SDPA round differently (the family table
    checks float32 to 1e-6)."""
    model, x = small_torchvision(), images(2, size=64)
    fast = evit_patch.apply(model, layers=[0, 1, 2, 3], keep=1.0)
    with torch.no_grad():
        want = model(x)
        assert (fast(x) - want).abs().max() <= 1e-12 * want.abs().max()


def test_original_keeps_its_multihead_attention():
    """The patched copy re-expresses nn.MultiheadAttention on parameters of its own."""
    model = small_torchvision()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.7)
    original, patched = model.encoder.layers[1].self_attention, fast.encoder.layers[1].self_attention
    assert isinstance(original, torch.nn.MultiheadAttention)
    assert patched.in_proj_weight is not original.in_proj_weight


def test_vit_b_16_has_the_timm_vit_b_cost():
    fast = evit_patch.apply(vit_b_16(), layers=[3, 6, 9], keep=0.7)
    report = evit_patch.explain(fast)
    assert [r.tokens_out for r in report.rows] == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    assert (round(report.macs_original / 1e9, 3), round(report.macs_patched / 1e9, 3)) == (17.564, 11.611)


def test_other_image_size_is_refused():
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"only accepts 64x64 images .* img_size=96"):
        evit_patch.apply(small_torchvision(), layers=[1], keep=0.7, img_size=96)


def test_unusual_attention_is_refused_by_block():
    model = small_torchvision()
    model.encoder.layers[2].self_attention = torch.nn.MultiheadAttention(64, 4, batch_first=False)
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"encoder\.layers\.encoder_layer_2\.self_attention"):
        evit_patch.apply(model, layers=[1], keep=0.7)


def timm_to_torchvision(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The key mapping from a timm ViT/DeiT state dict to torchvision's VisionTransformer."""
    out = {
        "conv_proj.weight": state["patch_embed.proj.weight"],
        "conv_proj.bias": state["patch_embed.proj.bias"],
        "class_token": state["cls_token"],
        "encoder.pos_embedding": state["pos_embed"],
        "encoder.ln.weight": state["norm.weight"],
        "encoder.ln.bias": state["norm.bias"],
        "heads.head.weight": state["head.weight"],
        "heads.head.bias": state["head.bias"],
    }
    pairs = {
        "ln_1": "norm1",
        "self_attention.in_proj": "attn.qkv",
        "self_attention.out_proj": "attn.proj",
        "ln_2": "norm2",
        "mlp.0": "mlp.fc1",
        "mlp.3": "mlp.fc2",
    }
    for i in range(depth):
        for tv, tm in pairs.items():
            sep = "_" if tv == "self_attention.in_proj" else "."
            for kind in ("weight", "bias"):
                out[f"encoder.layers.encoder_layer_{i}.{tv}{sep}{kind}"] = state[f"blocks.{i}.{tm}.{kind}"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["evit", "merge"])
def test_real_deit_tiny_weights_give_the_timm_patched_output(real_model, real_val_images, method):
    """The genuine DeiT-Tiny in torchvision's class, patched, equals the patched timm model."""
    tv = VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768)
    tv.load_state_dict(timm_to_torchvision(real_model.state_dict(), 12), strict=True)
    assert_patches_like_timm(tv, real_model, real_val_images[0][: 3 if method == "evit" else 2], method=method)
