"""timm's forward_intermediates / get_intermediate_layers on patched models: served before the first
reorganization (and the final features), refused by name after it (issue 15, item 7)."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import images, make_vit
from test_beit import _small as small_beit

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
        r"final features are returned as usual\), or call the original model$",
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
