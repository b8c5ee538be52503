"""timm ``Beit``: the relative position bias follows each surviving token's original position. The
shared checks (gradients, keep=1, MACs, compile, export, threads, ...) run in test_families.py."""

from __future__ import annotations

import pytest
import torch
from cases import small_beit
from conftest import images, make_vit
from tracked import check_export, check_matches_reference, check_permutation

import evit_patch


@pytest.mark.parametrize(
    "fuse, pool, fused_attn",
    [
        (fuse, pool, fused_attn)
        for fuse in (True, False)
        for pool in ("avg", "token")
        for fused_attn in (True, False)
        if (fuse, pool, fused_attn) != (True, "avg", True)  # the family table's model
    ],
)
def test_matches_reference(fuse, pool, fused_attn):
    model = small_beit(global_pool=pool)
    for block in model.blocks:
        block.attn.fused_attn = fused_attn  # SDPA with attn_mask, or softmax(q k^T + bias)
    check_matches_reference("beit", model, images(3, size=64), [1, 2], [0.6, 0.5], fuse)


def test_reordered_tokens_keep_their_bias_with_an_explicit_softmax(monkeypatch):
    """The bias added to q k^T before the softmax (the family table runs SDPA's attn_mask)."""
    model = small_beit()
    for block in model.blocks:
        block.attn.fused_attn = False
    check_permutation(model, images(2, size=64), monkeypatch, "gather_bias")


def test_base_model_cost():
    """BEiT-B keeps ViT-B's token schedule (its 12 blocks and 196 patches; the width does not enter it)."""
    model = make_vit("beit_base_patch16_224", dtype=torch.float32, embed_dim=64, num_heads=4)
    report = evit_patch.explain(evit_patch.apply(model, keep=0.7))
    assert [r.tokens_out for r in report.rows] == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3


def test_shared_relative_position_bias_follows_positions(monkeypatch):
    """use_shared_rel_pos_bias: the model passes one bias to every block; it stays a graph input
    and is re-indexed like a per-block one."""
    model = small_beit(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, depth=3)
    assert model.rel_pos_bias is not None and model.blocks[0].attn.relative_position_bias_table is None
    check_matches_reference("beit", model, images(3, size=64), [1, 2], [0.6, 0.5], True)
    check_export(model, images(3, size=64))
    check_permutation(model, images(2, size=64), monkeypatch, "gather_bias")
