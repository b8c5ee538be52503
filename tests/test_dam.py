"""``method="dam"`` (distinctive-attended merging), the class-token-only last block (``cls_only``) and
the searched schedule, each against an explicit reference: the per-sample definition in
``reference.py``, the ramp formula, and the search's own candidate scores."""

from __future__ import annotations

import pytest
import torch
from conftest import images, make_vit
from test_merge import small_vit
from tracked import check_compile, check_export, check_keep_one_is_exact, check_macs, check_matches_reference

import evit_patch
from evit_patch import InvalidPlanError
from evit_patch.families import find_family
from evit_patch.planning.explain import CostModel
from evit_patch.planning.objective import Objective
from evit_patch.planning.probe import dead_leaves, probe_images
from evit_patch.planning.schedule import candidates, plan_searched, ramp, search

DAM = dict(method="dam")


def test_matches_the_per_sample_definition():
    check_matches_reference("vit", small_vit(), images(3, 64), [1, 2], [0.6, 0.5], **DAM)


def test_without_a_class_token_ranks_by_received_attention():
    model = small_vit(class_token=False, global_pool="avg", fc_norm=False)
    check_matches_reference("vit", model, images(3, 64), [1, 2], [0.6, 0.5], **DAM)


def test_cls_only_matches_the_reference_and_changes_the_logits_by_rounding_only():
    model, x = small_vit(), images(3, 64)
    check_matches_reference("vit", model, x, [1, 2], 0.5, method="dam", cls_only=True)
    full = evit_patch.apply(model, layers=[1, 2], keep=0.5, **DAM)
    head_only = evit_patch.apply(model, layers=[1, 2], keep=0.5, cls_only=True, **DAM)
    with torch.no_grad():
        torch.testing.assert_close(head_only(x), full(x), rtol=0, atol=1e-12)
    rows = evit_patch.explain(head_only).rows
    assert rows[-1].tokens_out == 1 and rows[-1].macs_patched < evit_patch.explain(full).rows[-1].macs_patched
    assert "its MLP runs on the class token(s) only" in str(evit_patch.explain(head_only))


def test_cls_only_on_exact_evit_keeps_its_tokens_and_logits():
    model, x = make_vit(img_size=64, depth=4, num_classes=10), images(2, 64)
    exact = evit_patch.apply(model, layers=[1], keep=0.7)
    head_only = evit_patch.apply(model, layers=[1], keep=0.7, cls_only=True)
    with torch.no_grad():
        torch.testing.assert_close(head_only(x), exact(x), rtol=0, atol=1e-12)
    assert evit_patch.get_config(head_only).cls_only and not evit_patch.get_config(exact).cls_only


def test_cls_only_is_refused_for_heads_that_read_image_tokens():
    model = small_vit(class_token=False, global_pool="avg", fc_norm=False)
    with pytest.raises(
        InvalidPlanError,
        match=r"cls_only=True runs the last block's MLP on the class token\(s\) alone, exact only for a head "
        r"that reads nothing else, but its head pools the image tokens \(avg\); leave cls_only unset$",
    ):
        evit_patch.apply(model, layers=[1], keep=0.5, cls_only=True)


@pytest.mark.parametrize("cls_only", [False, True])
def test_explain_equals_counted_macs(cls_only):
    """The bipartite and kept-token similarities are counted; cls_only's saving too."""
    check_macs(small_vit(), images(1, 64), method="dam", cls_only=cls_only)


def test_keep_one_is_exact_and_compiles_and_exports():
    """Three blocks, as the family table's: reduced at 1 and 2, block 2 attends over merged tokens."""
    model = small_vit(depth=3)
    check_keep_one_is_exact(
        small_vit(torch.float32, depth=3), images(2, 64, dtype=torch.float32), layers=range(3), **DAM
    )
    check_compile(model, images(2, 64), **DAM)
    check_export(model, images(3, 64), method="dam", cls_only=True)


def test_an_odd_token_count_splits_the_even_side_one_larger():
    model = small_vit(img_size=48)  # 9 image tokens: 5 even, 4 odd
    check_matches_reference("vit", model, images(2, 48), [1], 0.5, **DAM)


def test_ramp_schedules_follow_the_formula():
    layers, keep = ramp(2, 3, 0.5, 6)
    assert layers == (2, 3, 4, 5)
    assert keep == pytest.approx([0.5 ** (1 / 3), 0.5 ** (2 / 3), 0.5, 0.5])
    assert ramp(0, 1, 0.8, 3) == ((0, 1, 2), (0.8, 0.8, 0.8))


def test_every_candidate_fills_the_budget_and_the_search_takes_the_closest():
    model = make_vit(img_size=64, depth=6, num_classes=10, dtype=torch.float32)
    family, cost = find_family(model), CostModel.of(model)
    target = 0.5 * cost.macs_original
    base = evit_patch.EViTConfig.build(range(6), 1.0, evit_patch.PlanOptions(method="dam", cls_only=True), num_blocks=6)
    found = candidates(cost, base, target, range(4))
    assert len(found) >= 4
    for config in found:
        assert cost.macs(config) <= target and config.layers[-1] == 4  # the last block is cls_only
        start, rate = config.layers[0], min(config.keep)
        assert config.keep[-1] == pytest.approx(rate)
        bigger = config.replace(keep=tuple(k**0.9 for k in config.keep))  # a larger rate overshoots
        assert cost.macs(bigger) > target or start == 0
    x = probe_images(model, (64, 64), 3, count=4)
    objective = Objective(model, x, 4, base)
    best, scored = search(objective, cost, base, target, progress=False)
    assert [s for s, _ in scored] == sorted(s for s, _ in scored) and best is scored[0][1]
    assert scored[0][0] == objective(best.layers, best.keep)[0]
    again, _ = plan_searched(model, family, cost, target, evit_patch.PlanOptions(method="dam"), progress=False)
    assert again.cls_only and again.layers[-1] == 4


def test_apply_with_a_budget_searches_once_and_meets_it():
    model = make_vit(img_size=64, depth=6, num_classes=10, dtype=torch.float32, embed_dim=48, num_heads=3)
    fast = evit_patch.apply(model, flops=0.55, **DAM)
    report = evit_patch.explain(fast)
    config = evit_patch.get_config(fast)
    assert report.macs_patched <= 0.55 * report.macs_original and config.cls_only
    assert config == evit_patch.plan(model, flops=0.55, **DAM)  # deterministic: same probe, same choice
    user = evit_patch.calibrate(model, images(8, 64, dtype=torch.float32), flops=0.55, progress=False, **DAM)
    assert user.baseline.cls_only and user.kl <= user.baseline_kl


def test_dead_leaves_are_deterministic_opaque_discs():
    a, b = dead_leaves(2, (32, 40), seed=3), dead_leaves(2, (32, 40), seed=3)
    assert a.shape == (2, 3, 32, 40) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    colours = {tuple(p.tolist()) for p in a[0].flatten(1).T}
    assert 1 < len(colours) < 32 * 40 / 4  # flat regions: far fewer colours than pixels
    assert not torch.equal(dead_leaves(2, (32, 40), seed=4), a)
    model = make_vit(img_size=64)  # normalised by the model's own mean and std, in its dtype
    mean, std = (torch.tensor(model.pretrained_cfg[k], dtype=torch.float64)[:, None, None] for k in ("mean", "std"))
    want = (dead_leaves(2, (64, 64)).double() - mean) / std
    torch.testing.assert_close(probe_images(model, (64, 64), 3, count=2), want, rtol=1e-6, atol=1e-6)


def test_the_schedule_search_shows_progress_unless_asked_not_to(capsys):
    model = make_vit(img_size=64, depth=4, num_classes=10, dtype=torch.float32, embed_dim=48, num_heads=3)
    quiet = evit_patch.plan(model, flops=0.6, progress=False, **DAM)
    assert "planning" not in capsys.readouterr().err
    assert evit_patch.get_config(evit_patch.apply(model, flops=0.6, progress=False, **DAM)) == quiet
    assert "planning" not in capsys.readouterr().err
    assert evit_patch.plan(model, flops=0.6, **DAM) == quiet
    assert "planning" in capsys.readouterr().err
