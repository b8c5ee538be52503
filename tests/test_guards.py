"""timm methods on patched models: forward_intermediates / get_intermediate_layers served before the first
reorganization (and final features), refused by name after it; set_input_size all or nothing (issue 15, items 7, 8)."""

from __future__ import annotations

import pickle

import pytest
import torch
from cases import small_beit
from conftest import images, make_vit

import evit_patch
from evit_patch import UnsupportedInputError


def _pair(make=lambda: make_vit(img_size=64, depth=4, num_classes=10)):
    model = make()
    return model, evit_patch.apply(model, layers=[2, 3], keep=0.5)


@pytest.mark.parametrize("make", [None, small_beit], ids=["vit", "beit"])
def test_intermediates_before_the_first_reorganization_match_the_original(make):
    model, fast = _pair(make) if make else _pair()
    x = images(2, size=64)
    with torch.no_grad():
        final, taken = fast.forward_intermediates(x, indices=[0, 1])
        _, expected = model.forward_intermediates(x, indices=[0, 1])
        assert [t.shape for t in taken] == [(2, 64 if make else 192, 4, 4)] * 2
        for got, want in zip(taken, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(final, fast.forward_features(x), rtol=0, atol=0)
        if hasattr(fast, "get_intermediate_layers"):  # Beit has none
            layers = fast.get_intermediate_layers(x, n=[1], reshape=True)
            torch.testing.assert_close(layers[0], expected[1], rtol=0, atol=0)


@pytest.mark.parametrize("call", ["forward_intermediates", "get_intermediate_layers"])
def test_intermediates_after_a_reorganization_are_refused(call):
    _, fast = _pair()
    x = images(2, size=64)
    with pytest.raises(
        UnsupportedInputError,
        match=r"^forward_intermediates: VisionTransformer \(deit_tiny_patch16_224\) reorganizes tokens from block 2 "
        r"on, so the outputs of blocks \[2, 3\] hold fewer tokens and no spatial grid; take blocks before 2 \(the "
        r"final features are returned as usual\), patch with evit_patch.apply\(\.\.\., dense=True\) to get every block "
        r"restored to the full grid, or call the original model$",
    ):
        if call == "forward_intermediates":
            fast.forward_intermediates(x)
        else:
            fast.get_intermediate_layers(x, n=2, reshape=True)


def test_the_guard_follows_copies():
    _, fast = _pair()
    loaded = pickle.loads(pickle.dumps(fast))
    assert loaded.forward_intermediates.model is loaded
    assert "forward_intermediates" not in fast.state_dict()


@pytest.mark.parametrize(
    "make",
    [
        lambda: make_vit(img_size=64, depth=4, num_classes=10),
        lambda: make_vit("vit_base_patch16_gap_224", img_size=64, depth=4, embed_dim=64, num_heads=4),
    ],
    ids=["vit", "vit_gap"],
)
def test_set_input_size_follows_where_the_blocks_can(make):
    model = make()
    fast = evit_patch.apply(model, layers=[2], keep=0.5)
    fast.set_input_size((96, 96))
    model.set_input_size((96, 96))
    x = images(2, size=96)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), evit_patch.apply(model, layers=[2], keep=0.5)(x), rtol=0, atol=0)


def test_set_input_size_on_beit_is_refused_and_changes_nothing():
    fast = evit_patch.apply(small_beit(), layers=[2], keep=0.5)
    x = images(2, size=64)
    with torch.no_grad():
        before = fast(x)
    with pytest.raises(
        UnsupportedInputError,
        match=r"^set_input_size: Beit \(beit_base_patch16_224\) was patched with blocks traced for its input size, "
        r"which cannot follow a new one \(.*set_window_size.*\); call set_input_size on the original model and "
        r"apply evit_patch again, or use evit_patch.apply\(model, ..., img_size=...\)$",
    ):
        fast.set_input_size((96, 96))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), before, rtol=0, atol=0)
