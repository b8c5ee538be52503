"""torchvision ``VisionTransformer``: attention re-expressed with SDPA on the same parameters."""

from __future__ import annotations

import pytest
import torch
from conftest import images
from reference import assert_patches_like_timm, reference_forward_torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import vit_b_16
from torchvision.models.vision_transformer import VisionTransformer

import evit_patch


def _small(dtype=torch.float64):
    """A small torchvision ViT with a randomised head: torchvision zero-initialises it, which
    would make every output comparison pass vacuously."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=8, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_(0, 0.2)
        model.class_token.normal_(0, 0.2)
    return model.to(dtype).eval()


@pytest.mark.parametrize("fuse", [True, False])
def test_matches_reference(fuse):
    model, x = _small(), images(3, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=[0.6, 0.5], fuse=fuse)
    with torch.no_grad():
        got, want = fast(x), reference_forward_torchvision(model, x, [1, 2], [0.6, 0.5], fuse)
    assert got.abs().max() > 0.1  # the head is not zero
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_keep_one_matches_original_to_float_rounding(dtype, tolerance):
    """Not bitwise: nn.MultiheadAttention's fused kernel and SDPA round differently."""
    model, x = _small(dtype), images(2, size=64, dtype=dtype)
    fast = evit_patch.apply(model, layers=[0, 1, 2, 3], keep=1.0)
    with torch.no_grad():
        want = model(x)
        assert (fast(x) - want).abs().max() <= tolerance * want.abs().max()


def test_gradients_match_reference():
    model, x = _small(), images(2, size=64)
    fast = evit_patch.apply(model, layers=[1], keep=0.5)
    fast(x).square().sum().backward()
    reference_forward_torchvision(model, x, [1], 0.5).square().sum().backward()
    got = dict(fast.named_parameters())
    for name, p in model.named_parameters():
        assert got[name].grad is not None, name
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-7, atol=1e-9, msg=name)


def test_original_untouched_and_state_dict_keys_kept():
    model = _small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.7)
    assert isinstance(model.encoder.layers[1].self_attention, torch.nn.MultiheadAttention)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(fast.state_dict()) == list(before)
    fast.load_state_dict(before, strict=True)


def test_explain_equals_counted_macs():
    model = _small()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    x = images(1, size=64)
    for m, expected in ((model, evit_patch.explain(fast).macs_original), (fast, evit_patch.explain(fast).macs_patched)):
        # With grad enabled nn.MultiheadAttention skips its fused fast path, which the counter misses.
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            m(x)
        assert counter.get_total_flops() // 2 == expected


def test_vit_b_16_has_the_timm_vit_b_cost():
    fast = evit_patch.apply(vit_b_16(), layers=[3, 6, 9], keep=0.7)
    report = evit_patch.explain(fast)
    assert [r.tokens_out for r in report.rows] == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    assert (round(report.macs_original / 1e9, 3), round(report.macs_patched / 1e9, 3)) == (17.564, 11.611)


def test_other_image_size_is_refused():
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"only accepts 64x64 images .* img_size=96"):
        evit_patch.apply(_small(), layers=[1], keep=0.7, img_size=96)


def test_unusual_attention_is_refused_by_block():
    model = _small()
    model.encoder.layers[2].self_attention = torch.nn.MultiheadAttention(64, 4, batch_first=False)
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"encoder\.layers\.encoder_layer_2\.self_attention"):
        evit_patch.apply(model, layers=[1], keep=0.7)


def test_fullgraph_compile_matches_eager():
    import torch._dynamo
    from torch._dynamo.utils import counters

    fast = evit_patch.apply(_small(torch.float32), layers=[1, 2], keep=0.7)
    x = images(2, size=64, dtype=torch.float32)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), fast(x), rtol=1e-4, atol=1e-4)
    assert dict(counters["graph_break"]) == {}


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
    assert_patches_like_timm(tv, real_model, real_val_images[0][: 8 if method == "evit" else 2], method=method)
