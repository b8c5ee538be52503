"""The token state (positions and sizes in extra channels) is confined: users' outputs never carry
it, a hook decodes it with ``split_state``, and what it cannot hold exactly is refused by name."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import images

import evit_patch
from evit_patch import token_state
from evit_patch.errors import UnsupportedInputError, UnsupportedModelError


def _vit(**kwargs):
    torch.manual_seed(0)
    options = dict(img_size=64, depth=4, num_classes=10) | kwargs
    return timm.create_model("vit_tiny_patch16_224", **options).eval()


def test_a_hook_on_a_merged_block_decodes_the_state_with_split_state():
    model = _vit()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method="merge")
    seen = {}

    def hook(module, args, output):
        seen["raw"] = output.shape
        seen["split"] = evit_patch.split_state(output, fast)

    handle = fast.blocks[2].register_forward_hook(hook)
    with torch.no_grad():
        fast(images(2, 64, dtype=torch.float32))
    handle.remove()
    tokens, positions, sizes = seen["split"]
    assert seen["raw"] == (2, 1 + 4, 192 + token_state.RAW_CHANNELS)  # 16 -> 8 -> 4 image tokens; float32
    assert tokens.shape == (2, 5, 192)
    assert positions.shape == sizes.shape == (2, 4)
    assert torch.equal(sizes.sum(1), torch.full((2,), 16.0))  # the merged tokens stand for every patch
    assert ((positions >= 0) & (positions < 16)).all()
    assert evit_patch.split_state(torch.zeros(2, 17, 192), fast)[1:] == (None, None)  # nothing moved yet
    with pytest.raises(UnsupportedInputError, match=r"^split_state: VisionTransformer \(vit_tiny.*\) is not an evit"):
        evit_patch.split_state(tokens, model)


def test_attention_pooled_features_have_the_librarys_width_and_the_head_refuses_them_stripped():
    model = _vit(class_token=False, global_pool="map", embed_dim=64, num_heads=4)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method="merge")
    x = images(2, 64, dtype=torch.float32)
    with torch.no_grad():
        features = fast.forward_features(x)
        assert features.shape == (2, 4, 64)
        assert fast(x).shape == (2, 10)
        with pytest.raises(UnsupportedInputError, match=r"^forward_head: VisionTransformer .* got 4 reduced tokens"):
            fast.forward_head(features)
        kept = evit_patch.apply(model, layers=[1, 2], keep=1.0)
        torch.testing.assert_close(kept.forward_head(kept.forward_features(x)), model(x), rtol=0, atol=0)


def test_token_counts_beyond_two_digits_are_refused_at_patch_time():
    token_state.check_capacity(token_state.MAX_IMAGE_TOKENS, "m")
    with pytest.raises(UnsupportedModelError, match=r"^m: 65536 image tokens; evit_patch tracks .* at most 65535"):
        token_state.check_capacity(65536, "m")
    big = timm.create_model(
        "vit_tiny_patch16_224", img_size=257, patch_size=1, depth=2, embed_dim=8, num_heads=1, num_classes=2
    ).eval()
    with pytest.raises(UnsupportedModelError, match=r"66049 image tokens"):
        evit_patch.apply(big, layers=[1], keep=0.5, method="merge")


@pytest.mark.parametrize(
    ("dtype", "width"),
    [
        (torch.bfloat16, token_state.STATE_CHANNELS),
        (torch.float16, 4),
        (torch.float32, token_state.RAW_CHANNELS),
        (torch.float64, 2),
    ],
)
def test_positions_and_sizes_round_trip_exactly_at_the_limit(dtype, width):
    count = token_state.MAX_IMAGE_TOKENS
    positions = torch.tensor([[0, count - 1, -1]])
    sizes = torch.tensor([[1.0, float(count), 255.0]])
    packed = token_state.pack(torch.zeros(1, 4, 2, dtype=dtype), positions, sizes, num_prefix=1)
    assert packed.shape == (1, 4, 2 + width)
    _, got_positions, got_sizes = token_state.unpack(packed, 2, 1)
    assert torch.equal(got_positions, positions) and torch.equal(got_sizes, sizes)


def test_a_dtype_that_cannot_hold_the_state_is_refused_by_name():
    x = torch.zeros(1, 3, 2).to(torch.float8_e4m3fn)
    with pytest.raises(UnsupportedInputError, match=r"needs float16, bfloat16, float32 or float64; got torch.float8"):
        token_state.pack(x, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), num_prefix=1)
