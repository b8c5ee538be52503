"""Every refusal names the model, the block and what was expected; nothing is ever half-patched."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from conftest import images, make_vit
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock, VisionTransformer

import evit_patch
from evit_patch import InvalidPlanError, UnsupportedInputError, UnsupportedModelError
from evit_patch.reductions.base import Permutation


def _tiny(**kwargs):
    kwargs = dict(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2) | kwargs
    return VisionTransformer(**kwargs).eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(global_pool=""), r"has global_pool='': its output reads every image token one by one"),
        (dict(global_pool="max"), r"has global_pool='max': .* expected global_pool='token' or 'avg'"),
        (
            dict(class_token=False, reg_tokens=1, global_pool="avg", pool_include_prefix=True),
            r"averages prefix and image tokens together \(pool_include_prefix=True\)",
        ),
    ],
    ids=["no_pool", "max_pool", "pool_include_prefix"],
)
def test_heads_that_read_every_token_are_refused(kwargs, message):
    with pytest.raises(UnsupportedModelError, match=message):
        evit_patch.apply(_tiny(**kwargs), layers=[1], keep=0.7)


def test_attention_pool_outside_timm_vit_is_refused():
    """timm.VisionTransformer's 'map' head is served (tests/test_attention_pool.py); EVA's pools
    every token, prefix included, through other code, and stays refused."""
    model = make_vit("eva02_tiny_patch14_224", img_size=56, depth=2, global_pool="map")
    with pytest.raises(
        UnsupportedModelError,
        match=r"^Eva \(eva02_tiny_patch14_224\) pools with an attention-pool head \(global_pool='map'\); "
        r"expected global_pool='token' or 'avg'$",
    ):
        evit_patch.apply(model, layers=[1], keep=0.7)


@pytest.mark.parametrize(
    ("block_fn", "message"),
    [
        (
            ParallelScalingBlock,
            r"VisionTransformer.blocks.0: expected the MLP to run after the attention residual add, "
            r"but .* runs beside the attention \(a parallel block",
        ),
        (
            partial(ParallelThingsBlock, num_parallel=2),
            r"VisionTransformer.blocks.0: expected exactly one attention op .* found 2 "
            r"\(parallel branches, or differential attention\)",
        ),
    ],
    ids=["parallel_scaling", "parallel_things"],
)
def test_parallel_blocks_are_refused(block_fn, message):
    with pytest.raises(UnsupportedModelError, match=message):
        evit_patch.apply(_tiny(block_fn=block_fn), layers=[1], keep=0.7)


@pytest.mark.parametrize(
    ("layers", "keep", "message"),
    [
        ([12], 0.7, r"layer 12 is out of range; the model has 12 blocks \(valid indices 0..11\)"),
        ([-1], 0.7, r"layer -1 is out of range"),
        ([3, 3], 0.7, r"layers \[3\] are repeated"),
        ([], 0.7, r"layers is empty"),
        ([2.0], 0.7, r"layer indices must be integers, got 2.0"),
        ([3], 0.0, r"layer 3: keep must be a number in \(0, 1\], got 0.0"),
        ([3], 1.5, r"keep must be a number in \(0, 1\], got 1.5"),
        ([3], float("nan"), r"keep must be a number in \(0, 1\], got nan"),
        ([3], True, r"keep must be a number in \(0, 1\], got True"),
        ([3, 6], [0.7], r"got 1 keep rates for 2 layers"),
    ],
)
def test_bad_plans_are_refused(layers, keep, message):
    with pytest.raises(InvalidPlanError, match=r"VisionTransformer \(deit_tiny_patch16_224\).*" + message):
        evit_patch.apply(timm.create_model("deit_tiny_patch16_224"), layers=layers, keep=keep)


def test_non_vits_and_known_families_are_refused_by_name():
    with pytest.raises(
        UnsupportedModelError,
        match=r"^timm\.models\.resnet\.ResNet \(resnet18\) is not a vision transformer evit_patch knows: no "
        r"registered family matches it, and structural discovery found no stack of attention blocks",
    ):
        evit_patch.apply(timm.create_model("resnet18"), layers=[1], keep=0.7)
    with pytest.raises(UnsupportedModelError, match=r"expects a torch.nn.Module vision transformer, got str"):
        evit_patch.apply("deit_small_patch16_224", layers=[1], keep=0.7)
    with pytest.raises(
        UnsupportedModelError, match=r"SwinTransformer \(swin_tiny_patch4_window7_224\) is not supported by evit_patch"
    ):
        evit_patch.apply(timm.create_model("swin_tiny_patch4_window7_224"), layers=[1], keep=0.7)
    with pytest.raises(UnsupportedModelError, match=r"PoolingVisionTransformer \(pit_ti_224\) .* hierarchical"):
        evit_patch.apply(timm.create_model("pit_ti_224"), layers=[1], keep=0.7)
    with pytest.raises(UnsupportedModelError, match=r"Cait \(cait_xxs24_224\) .* class token joins only"):
        evit_patch.apply(timm.create_model("cait_xxs24_224", img_size=64), layers=[1], keep=0.7)


def test_user_attention_mask_is_refused_at_call_time():
    fast = evit_patch.apply(make_vit(), layers=[3], keep=0.7)
    mask = torch.zeros(197, 197, dtype=torch.float64)
    with pytest.raises(
        UnsupportedInputError,
        match=r"\(deit_tiny_patch16_224\).blocks.3 was patched by evit_patch with attn_mask=None; "
        r"EViT reorders and drops tokens, so it cannot honour a caller-supplied attn_mask",
    ):
        fast(images(1), attn_mask=mask)


class _MaskedBlock(torch.nn.Module):
    """A block that always passes a mask to its attention: a constant one, or one made from the tokens."""

    def __init__(self, block, from_tokens: bool):
        super().__init__()
        self.inner, self.from_tokens = block, from_tokens
        self.register_buffer("mask", torch.randn(17, 17, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        mask = x[0, :, :1] @ x[0, :, :1].T if self.from_tokens else self.mask
        return self.inner(x, attn_mask=mask)


def test_attention_mask_made_from_the_tokens_is_refused():
    model = _tiny()
    model.blocks[2] = _MaskedBlock(model.blocks[2], from_tokens=True)
    with pytest.raises(
        UnsupportedModelError, match=r"blocks.2: expected attention without a mask, or with one position bias "
    ):
        evit_patch.apply(model, layers=[1], keep=0.7)


def test_constant_attention_mask_is_followed_like_a_position_bias():
    """A constant (N, N) mask is a position bias: reordering every token must not change the output."""
    model = _tiny()
    model.blocks[2] = _MaskedBlock(model.blocks[2], from_tokens=False)
    model = model.double()
    fast = evit_patch.apply(model, layers=[1], keep=1.0)
    evit_patch.reorganizers(fast)[0].reduction = Permutation()
    x = images(2, size=64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-12)
        assert (evit_patch.apply(model, layers=[1], keep=0.5)(x) - model(x)).abs().max() > 1e-3


def test_nothing_is_half_patched_after_a_late_failure():
    """Block 3 is parallel: the error comes after blocks 0-2 were traced, yet the model is untouched."""
    model = _tiny()
    model.blocks[3] = ParallelScalingBlock(64, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    children = list(model.blocks)
    with pytest.raises(UnsupportedModelError, match=r"blocks.3"):
        evit_patch.apply(model, layers=[0, 1], keep=0.5)
    assert list(model.blocks) == children and not evit_patch.is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
