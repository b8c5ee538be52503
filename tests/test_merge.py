"""Token merging (``method="merge"``) beyond the shared checks, which every family runs for merging
in test_families.py: against the explicit float64 reference in ``reference.py`` (per-sample Python:
sort, cosine of keys, size-weighted means, log(size) in later attention logits) without proportional
attention, with an explicit softmax, and proportional attention for EViT; tracking, saving, planning."""

from __future__ import annotations

import torch
from cases import small_vit
from conftest import images, make_vit
from tracked import check_matches_reference

import evit_patch
from evit_patch.analysis.tracking import track_tokens

MERGE = dict(method="merge")


def test_without_proportional_attention_matches_reference():
    check_matches_reference("vit", small_vit(), images(3, 64), [1, 2], [0.6, 0.5], method="merge", proportional=False)


def test_manual_attention_matches_reference():
    """An explicit softmax: the keys are the k^T operand of q @ k^T, the size bias joins the logits."""
    model = small_vit()
    for block in model.blocks:
        block.attn.fused_attn = False
    check_matches_reference("vit", model, images(3, 64), [1, 2], 0.5, method="merge")


def test_evit_with_proportional_attention_matches_reference():
    check_matches_reference("vit", small_vit(), images(3, 64), [1, 2], 0.5, proportional=True)


def test_track_tokens_follows_merged_patches():
    model = small_vit()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, **MERGE)
    trace = track_tokens(fast, images(2, 64))
    for stage in trace.stages:
        assert torch.equal(stage.members.sum(1), torch.ones(2, 16, dtype=torch.long))  # a partition
        assert not stage.fused
    last = trace.stages[-1]
    assert last.members.shape[1] == 4  # ceil(0.5 * ceil(0.5 * 16))
    torch.testing.assert_close(last.weights.sum(-1), torch.ones(2, 4, dtype=torch.float64))


def test_config_round_trips_through_save_and_load(tmp_path):
    model = make_vit(num_classes=10, depth=4, img_size=64)
    fast = evit_patch.apply(model, layers=[1, 2, 3], keep=0.6, **MERGE)
    evit_patch.save_pretrained(fast, tmp_path / "out", model_kwargs={"depth": 4, "img_size": 64, "num_classes": 10})
    loaded = evit_patch.load_pretrained(tmp_path / "out")
    assert evit_patch.get_config(loaded) == evit_patch.get_config(fast)
    assert evit_patch.get_config(loaded).method is evit_patch.Method.MERGE
    x = images(2, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))


def test_budget_plan_spreads_merging_over_later_blocks():
    model = make_vit(num_classes=10, img_size=64)
    config = evit_patch.plan(model, flops=0.65, **MERGE)
    assert config.layers == tuple(range(3, 12)) and config.method is evit_patch.Method.MERGE
    fast = evit_patch.apply(model, flops=0.65, **MERGE)
    assert evit_patch.get_config(fast) == config
    assert evit_patch.explain(fast).macs_patched <= 0.65 * evit_patch.explain(fast).macs_original
