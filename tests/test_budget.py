"""Budget planning: analytic plans meet the budget exactly as counted, calibrated plans only improve."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import images, make_vit
from test_explain import _counted_macs
from timm.models.vision_transformer import VisionTransformer

import evit_patch
from evit_patch import EViTConfig, InvalidPlanError
from evit_patch.config import PlanOptions
from evit_patch.planning.budget import fewest_kept, plan_for_budget
from evit_patch.planning.explain import CostModel


@pytest.fixture(scope="module")
def tiny():
    return make_vit(dtype=torch.float32)


@pytest.mark.parametrize("fraction", [0.9, 0.66, 0.5])
def test_flops_budget_is_met_as_counted_and_is_the_largest_keep(tiny, fraction):
    config = evit_patch.plan(tiny, flops=fraction)
    assert config.layers == (3, 6, 9) and len(set(config.keep)) == 1
    fast = evit_patch.apply(tiny, flops=fraction)
    assert evit_patch.get_config(fast) == config
    x = images(1, dtype=torch.float32)
    counted, original = _counted_macs(fast, x), _counted_macs(tiny, x)
    assert counted == evit_patch.explain(fast).macs_patched <= fraction * original
    larger = EViTConfig(config.layers, tuple(k + 0.01 for k in config.keep))
    assert evit_patch.explain(tiny, config=larger).macs_patched > fraction * original


def test_speedup_budget_equals_its_flops_fraction_and_is_deterministic(tiny):
    assert (
        evit_patch.plan(tiny, speedup=1.5) == evit_patch.plan(tiny, flops=1 / 1.5) == evit_patch.plan(tiny, speedup=1.5)
    )
    assert evit_patch.plan(tiny, flops=1.0).keep == (1.0, 1.0, 1.0)


def test_default_layers_scale_with_depth():
    deep = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=24, num_heads=2)
    assert evit_patch.plan(deep, flops=0.9).layers == (6, 12, 18)


def test_budget_errors_explain_why(tiny):
    with pytest.raises(
        InvalidPlanError,
        match=r"VisionTransformer \(deit_tiny_patch16_224\): a budget of 0\.125 GMACs \(0\.100x of 1\.254\) is "
        r"infeasible at layers \[3, 6, 9\]: keeping a single token there still costs 0\.391 GMACs \(0\.312x\); "
        r"reorganize at earlier or more layers",
    ):
        evit_patch.plan(tiny, flops=0.1)
    with pytest.raises(InvalidPlanError, match="give exactly one budget"):
        evit_patch.plan(tiny, flops=0.5, speedup=2.0)
    with pytest.raises(InvalidPlanError, match=r"speedup budget must be a positive number, got -1"):
        evit_patch.plan(tiny, speedup=-1)
    with pytest.raises(InvalidPlanError, match="give keep or a budget"):
        evit_patch.apply(tiny, keep=0.5, flops=0.5)


def test_budget_above_the_original_is_refused_unless_resized(tiny):
    """flops > 1 (speedup < 1) would plan keep 1.0 everywhere: overhead and no saving. At another input size
    the budget is relative to the native one and may exceed it."""
    for budget, bound in (
        (dict(flops=1.5), "flops budget must be at most 1"),
        (dict(speedup=0.5), "speedup .* least 1"),
    ):
        with pytest.raises(InvalidPlanError, match=rf"^{bound} at the model's own input size, got .*: a plan costs"):
            evit_patch.plan(tiny, **budget)
    with pytest.raises(InvalidPlanError, match="flops budget must be at most 1"):
        evit_patch.apply(tiny, flops=1.5)  # refused before anything is traced
    assert evit_patch.plan(tiny, flops=1.2, img_size=272).keep[0] < 1.0


def test_plan_keeping_fewer_than_a_handful_of_image_tokens_warns_once(tiny):
    """speedup=3 on DeiT-Tiny plans down to one image token (0/8 agreement on real images, issue 23)."""
    message = (
        r"^VisionTransformer \(deit_tiny_patch16_224\): the plan for this budget \(0\.332x MACs, keep 0\.0969 at "
        r"layers \[3, 6, 9\]\) keeps 1 image token\(s\) from block 9 on, of 196: with fewer than 4 the predictions"
    )
    with pytest.warns(UserWarning, match=message) as caught:
        evit_patch.plan(tiny, speedup=3)
    assert len(caught) == 1
    cost = CostModel.of(tiny)
    target = 0.4 * cost.macs_original  # speedup 2.5
    with pytest.warns(UserWarning, match=r"keep 0\.5561 .* keeps 2 image token\(s\) from block 11 on"):
        plan_for_budget(cost, target_macs=target, options=PlanOptions.build(method="merge"), where="VisionTransformer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fewest_kept(cost, plan_for_budget(cost, target_macs=target)) == (6, 9)  # EViT (and its fused token)


def test_same_cost_higher_resolution(tiny):
    """EViT's second result: 272 px at the cost of the original at 224 px."""
    fast = evit_patch.apply(tiny, flops=1.0, img_size=272)
    assert fast.patch_embed.img_size == (272, 272) and tiny.patch_embed.img_size == (224, 224)
    counted = _counted_macs(fast, images(1, 272, dtype=torch.float32))
    original = _counted_macs(tiny, images(1, 224, dtype=torch.float32))
    assert counted == evit_patch.explain(fast).macs_patched
    assert 0.99 * original <= counted <= original
    assert 0.69 < evit_patch.get_config(fast).keep[0] < 0.72  # the paper's keep 0.7


def test_calibration_stays_within_budget_improves_and_is_deterministic():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=3).eval()
    x = torch.randn(16, 3, 64, 64)
    kwargs = dict(flops=0.6, batch_size=16, max_evaluations=12, progress=False)
    result = evit_patch.calibrate(model, x, **kwargs)
    assert result == evit_patch.calibrate(model, x, **kwargs)
    assert result.baseline == evit_patch.plan(model, flops=0.6)
    assert result.kl <= result.baseline_kl and result.evaluations <= 12
    fast = evit_patch.apply(model, result.config.layers, result.config.keep)
    counted = _counted_macs(fast, x[:1])
    assert counted == evit_patch.explain(fast).macs_patched <= 0.6 * _counted_macs(model, x[:1])
    with torch.inference_mode():
        ref, out = model(x).log_softmax(-1), fast(x).log_softmax(-1)
    kl = torch.nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean").item()
    assert kl == pytest.approx(result.kl, rel=1e-4)


def test_calibrate_names_raw_pixels_and_its_plan_applies_in_one_line(tiny):
    """uint8 pixels would fail in the patch embedding's convolution; a result applies with apply_kwargs()."""
    with pytest.raises(
        evit_patch.UnsupportedInputError,
        match=r"^calibrate: images are torch\.uint8; VisionTransformer \(deit_tiny_patch16_224\) takes torch\.float32 "
        r"images: preprocess them as the model expects, e\.g\. timm\.data\.create_transform\(.*\.to\(torch\.float32\)$",
    ):
        evit_patch.calibrate(tiny, torch.zeros(2, 3, 224, 224, dtype=torch.uint8), flops=0.7)
    config = EViTConfig((3, 7), (0.6, 0.9)).with_options(PlanOptions.build(method="merge"))
    result = evit_patch.CalibrationResult(config, 0.1, 0.9, config, 0.2, 0.8, 3)
    assert evit_patch.get_config(evit_patch.apply(tiny, **result.apply_kwargs())) == config
