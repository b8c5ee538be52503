"""timm ``Beit``: the relative position bias follows each surviving token's original position."""

from __future__ import annotations

import pytest
import torch
from conftest import images, make_vit
from tracked import (
    check_compile,
    check_export,
    check_gradient_checkpointing,
    check_gradients,
    check_keep_one_is_exact,
    check_macs,
    check_matches_reference,
    check_original_untouched,
    check_permutation,
    check_threads,
    randomise,
)

import evit_patch


def _small(dtype=torch.float64, **kwargs):
    options = dict(img_size=64, depth=4, embed_dim=64, num_heads=4, num_classes=10) | kwargs
    return randomise(make_vit("beit_base_patch16_224", dtype=dtype, **options))


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("pool", ["avg", "token"])
@pytest.mark.parametrize("fused_attn", [True, False])
def test_matches_reference(fuse, pool, fused_attn):
    model = _small(global_pool=pool)
    for block in model.blocks:
        block.attn.fused_attn = fused_attn  # SDPA with attn_mask, or softmax(q k^T + bias)
    check_matches_reference("beit", model, images(3, size=64), [1, 2], [0.6, 0.5], fuse)


def test_keep_one_is_exact():
    check_keep_one_is_exact(_small(torch.float32), images(2, size=64, dtype=torch.float32))


@pytest.mark.parametrize("fused_attn", [True, False])
def test_reordered_tokens_keep_their_bias(monkeypatch, fused_attn):
    model = _small()
    for block in model.blocks:
        block.attn.fused_attn = fused_attn
    check_permutation(model, images(2, size=64), monkeypatch, "gather_bias")


def test_gradients_match_reference():
    check_gradients("beit", _small(), images(2, size=64))


def test_original_untouched_and_state_dict_keys_kept():
    check_original_untouched(_small())


def test_explain_equals_counted_macs():
    check_macs(_small(), images(1, size=64))


def test_fullgraph_compile_matches_eager():
    check_compile(_small(torch.float32), images(2, size=64))


def test_concurrent_calls():
    check_threads(_small(), images(2, size=64))


def test_base_model_cost():
    """BEiT-B keeps ViT-B's token schedule; the bias gather adds no MACs."""
    report = evit_patch.explain(evit_patch.apply(make_vit("beit_base_patch16_224", dtype=torch.float32), keep=0.7))
    assert [r.tokens_out for r in report.rows] == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3


def test_shared_relative_position_bias_follows_positions(monkeypatch):
    """use_shared_rel_pos_bias: the model passes one bias to every block; it stays a graph input
    and is re-indexed like a per-block one."""
    model = _small(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    assert model.rel_pos_bias is not None and model.blocks[0].attn.relative_position_bias_table is None
    check_matches_reference("beit", model, images(3, size=64), [1, 2], [0.6, 0.5], True)
    check_export(model, images(3, size=64))
    check_permutation(model, images(2, size=64), monkeypatch, "gather_bias")


def test_export_matches_eager():
    check_export(_small(), images(3, size=64))


def test_gradient_checkpointing():
    check_gradient_checkpointing(_small(), images(2, size=64))
