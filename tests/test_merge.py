"""Token merging (``method="merge"``): every property exact EViT has, against the explicit float64
reference in ``reference.py`` (per-sample Python: sort, cosine of keys, size-weighted means,
log(size) in later attention logits)."""

from __future__ import annotations

import pytest
import torch
from conftest import images, make_vit
from test_beit import _small as small_beit
from test_eva import _images as eva_images
from test_eva import _small as small_eva
from tracked import (
    check_compile,
    check_export,
    check_gradient_checkpointing,
    check_gradients,
    check_keep_one_is_exact,
    check_macs,
    check_matches_reference,
    check_original_untouched,
    check_threads,
    randomise,
)

import evit_patch
from evit_patch.analysis.tracking import track_tokens

MERGE = dict(method="merge")


def small_vit(dtype=torch.float64, **kwargs):
    options = dict(img_size=64, depth=4, embed_dim=64, num_heads=4, num_classes=10) | kwargs
    return randomise(make_vit("vit_base_patch16_224", dtype=dtype, **options))


def _images64(dtype=torch.float64):
    return images(3, 64, dtype=dtype)


def _eva(dtype=torch.float64):
    return small_eva(dtype=dtype)


def _eva_images(dtype=torch.float64):
    return eva_images(dtype=dtype)


MODELS = {  # name: (reference kind, model(dtype), images(dtype))
    "vit": ("vit", small_vit, _images64),
    "vit_gap": (
        "vit",
        lambda dtype=torch.float64: small_vit(dtype, class_token=False, global_pool="avg", fc_norm=False),
        _images64,
    ),
    "beit": ("beit", small_beit, _images64),
    "eva": (
        "eva",
        lambda dtype=torch.float64: small_eva(dtype=dtype),
        lambda dtype=torch.float64: eva_images(dtype=dtype),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_matches_reference(name):
    kind, model, x = MODELS[name]
    check_matches_reference(kind, model(), x(), [1, 2], [0.6, 0.5], **MERGE)


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


@pytest.mark.parametrize("name", list(MODELS))
def test_keep_one_is_exact(name):
    _, model, x = MODELS[name]
    check_keep_one_is_exact(model(torch.float32), x(torch.float32), **MERGE)


@pytest.mark.parametrize("name", ["vit", "beit"])
def test_gradients_match_reference(name):
    kind, model, x = MODELS[name]
    check_gradients(kind, model(), x()[:2], **MERGE)


@pytest.mark.parametrize("name", ["vit", "vit_gap", "beit"])
def test_explain_equals_counted_macs(name):
    """The key similarities are counted (the index_add merge and the sort are not FLOPs)."""
    _, model, x = MODELS[name]
    check_macs(model(), x()[:1], **MERGE)


@pytest.mark.parametrize("name", ["vit"])
def test_fullgraph_compile_matches_eager(name):
    _, model, x = MODELS[name]
    check_compile(model(), x(), **MERGE)  # inductor lowers merging in test_compile.py


@pytest.mark.parametrize("name", ["beit"])
def test_export_matches_eager(name):
    _, model, x = MODELS[name]
    check_export(model(), x(), **MERGE)


def test_concurrent_calls():
    check_threads(small_vit(), images(2, 64), **MERGE)


def test_gradient_checkpointing():
    check_gradient_checkpointing(small_vit(), images(2, 64), **MERGE)


def test_original_untouched_and_state_dict_keys_kept():
    check_original_untouched(small_vit())


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
