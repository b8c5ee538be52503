"""Options of the public verbs are type-checked and a patched model is not patched twice (issue 15, items 1, 4)."""

from __future__ import annotations

import pytest
import torch
from conftest import images, make_vit

import evit_patch
from evit_patch import EViTConfig, InvalidPlanError

WHO = r"VisionTransformer \(deit_tiny_patch16_224\)"


def _small():
    return make_vit(img_size=64, depth=4, num_classes=10)


@pytest.mark.parametrize("keep", [0.95, 0.9, 0.5])
def test_apply_on_a_patched_model_is_refused(keep):
    fast = evit_patch.apply(_small(), layers=[1, 2], keep=keep)
    with pytest.raises(
        InvalidPlanError,
        match=rf"^apply: {WHO} is already patched \(reorganizes at layers \[1, 2\]\); change its keep rates with "
        r"evit_patch.set_keep\(model, keep\), or apply to the original, unpatched model$",
    ):
        evit_patch.apply(fast, layers=[1, 2], keep=keep)


def test_set_keep_is_the_way_to_change_a_patched_model():
    model, x = _small(), images(2, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.9)
    evit_patch.set_keep(fast, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), evit_patch.apply(model, layers=[1, 2], keep=0.5)(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fuse": "no"}, r"fuse must be True or False, got 'no' \(str\)"),
        ({"fuse": 0}, r"fuse must be True or False, got 0 \(int\)"),
        ({"keep": "0.7"}, r"keep must be a number in \(0, 1\] or a list of them, one per layer, got '0.7' \(str\)"),
        (
            {"keep": torch.tensor(0.7)},
            r"keep must be a number or a list of numbers, got a tensor of shape \(\); pass keep=tensor.item\(\)",
        ),
        (
            {"keep": torch.tensor([0.7, 0.5, 0.5])},
            r"keep must be a number or a list of numbers, got a tensor of shape \(3,\); pass keep=tensor.tolist\(\)",
        ),
        ({"layers": "3"}, r"layers must be a block index or a list of them, got '3' \(str\)"),
    ],
)
def test_options_of_the_wrong_type_are_named(options, message):
    with pytest.raises(InvalidPlanError, match=rf"^{WHO}: {message}$"):
        evit_patch.apply(_small(), **options)


def test_budget_fuse_is_checked():
    with pytest.raises(InvalidPlanError, match=r"fuse must be True or False, got 'no' \(str\)$"):
        evit_patch.apply(_small(), flops=0.8, fuse="no")


def test_set_keep_types_are_checked():
    fast = evit_patch.apply(_small(), layers=[1, 2], keep=0.7)
    with pytest.raises(InvalidPlanError, match=r"^set_keep: keep must be a number in \(0, 1\] or a list"):
        evit_patch.set_keep(fast, "0.5")
    with pytest.raises(InvalidPlanError, match=r"^set_keep: keep must be a number or a list of numbers, got a tensor"):
        evit_patch.set_keep(fast, torch.tensor(0.5))
    assert evit_patch.get_config(fast).keep == (0.7, 0.7)


def test_config_from_dict_checks_fuse():
    with pytest.raises(InvalidPlanError, match=r"^EViTConfig: fuse must be True or False, got 'no' \(str\)$"):
        EViTConfig.from_dict({"layers": [1], "keep": [0.7], "fuse": "no"})


def test_explain_of_an_unpatched_model_names_explain():
    with pytest.raises(
        InvalidPlanError,
        match=rf"^explain: {WHO} is not an evit_patch model; call evit_patch.apply first, "
        r"or pass config=EViTConfig\(...\) to explain a plan$",
    ):
        evit_patch.explain(_small())
