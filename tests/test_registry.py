"""The family registry: the most specific family wins, whatever the registration order."""

from __future__ import annotations

import pytest
from timm.models.vision_transformer import VisionTransformer

import evit_patch
from evit_patch.families import find_family, registry
from evit_patch.families.base import RefusedFamily


class _Sub(VisionTransformer):
    """A subclass some other library might define on top of timm's ViT."""


def _tiny(cls):
    return cls(img_size=32, patch_size=16, depth=1, embed_dim=32, num_heads=2, num_classes=4)


@pytest.mark.parametrize("first", [True, False], ids=["registered_first", "registered_last"])
def test_a_family_for_a_subclass_beats_the_base_family_in_any_order(monkeypatch, first):
    refusal = RefusedFamily("test.Sub", {f"{_Sub.__module__}.{_Sub.__qualname__}"}, "a test subclass")
    families = [refusal, *registry._FAMILIES] if first else [*registry._FAMILIES, refusal]
    monkeypatch.setattr(registry, "_FAMILIES", families)
    assert find_family(_tiny(_Sub)) is refusal
    assert find_family(_tiny(VisionTransformer)).name == "timm.VisionTransformer"
    with pytest.raises(evit_patch.UnsupportedModelError, match="_Sub is not supported by evit_patch: a test subclass"):
        evit_patch.apply(_tiny(_Sub), layers=[0])


def test_every_family_names_its_classes():
    assert all(family.classes for family in registry._FAMILIES)
