"""ToMe's unmerge (tools/tome_baseline.py) and the metrics of tools/dense_quality.py, on a random-init tiny ViT."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import images, make_vit

sys.path.append(str(Path(__file__).resolve().parents[1] / "tools"))  # after everything: tools/ names shadow nothing

import tome_baseline  # noqa: E402
from tome_baseline import (  # noqa: E402
    apply_tome,
    attention,
    bipartite_soft_matching,
    merge_weighted,
    tome_intermediates,
    tracked_block,
)

_path = list(sys.path)
import dense_quality  # noqa: E402

sys.path[:] = _path  # dense_quality puts tools/ first; its names must shadow nothing


def tiny():
    return make_vit("vit_tiny_patch16_224", depth=4, img_size=64)  # 16 patches + [CLS]


def pre_edit_block(blk, x, size, r):
    """``tome_baseline.block`` as it was before owner tracking existed, verbatim."""
    out, keys = attention(blk.attn, blk.norm1(x), size)
    x = x + blk.drop_path1(blk.ls1(out))
    if r > 0:
        x, size = merge_weighted(bipartite_soft_matching(keys, r), x, size)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size


def embed(model, x):
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


@pytest.mark.parametrize("indices", [[0, 1, 2, 3], [1, 3], 2, [-1]])
@pytest.mark.parametrize("norm", [True, False])
@torch.inference_mode()
def test_r0_unmerge_is_the_original_intermediates_exactly(indices, norm):
    model, x = tiny(), images(2, 64)
    want = model.forward_intermediates(x, indices=indices, norm=norm, output_fmt="NLC", intermediates_only=True)
    got = tome_intermediates(apply_tome(model, r=0), x, indices, norm=norm)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == (2, 16, 192)
        assert torch.equal(a, b)


@torch.inference_mode()
def test_the_owner_map_is_a_valid_assignment_whose_counts_are_the_sizes():
    model, x = apply_tome(tiny(), r=[3, 2, 2, 1]), images(3, 64)
    x = embed(model, x)
    owner, size = torch.arange(1, 17).expand(3, -1), None
    for blk, r in zip(model.blocks, model.blocks.r):
        x, size, owner = tracked_block(blk, x, size, r, owner)
        assert owner.shape == (3, 16) and owner.dtype == torch.long
        assert owner.min() >= 1 and owner.max() < x.shape[1]  # an existing token, never [CLS]
        for b in range(3):
            counts = torch.bincount(owner[b], minlength=x.shape[1]).double()
            assert counts[0] == 0 and size[b, 0, 0] == 1
            assert torch.equal(counts[1:], size[b, 1:, 0])  # every image token carries its `size` patches
    assert x.shape[1] == 17 - 8


@torch.inference_mode()
def test_restored_grids_equal_a_source_matrix_reference():
    """Reference: the official ToMe bookkeeping, a one-hot source matrix (B, N, P) merged with ``amax``
    at each merge, and each patch's feature read through it by a matmul."""
    model, x = apply_tome(tiny(), r=[2, 3, 1, 2]), images(2, 64)
    got = tome_intermediates(model, x, [0, 2, 3], norm=True)
    h, size, want = embed(model, x), None, []
    source = torch.eye(17, dtype=h.dtype)[:, 1:].expand(2, -1, -1)  # token i carries patch p: source[:, i, p]
    for index, (blk, r) in enumerate(zip(model.blocks, model.blocks.r)):
        out, keys = attention(blk.attn, blk.norm1(h), size)
        h = h + out
        merge = bipartite_soft_matching(keys, r)
        source = merge(source, "amax")
        h, size = merge_weighted(merge, h, size)
        h = h + blk.mlp(blk.norm2(h))
        assert torch.equal(source.sum(1), torch.ones(2, 16, dtype=h.dtype))  # each patch in one token
        if index in (0, 2, 3):
            want.append(source.transpose(1, 2) @ model.norm(h))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert all(len(torch.unique(grid, dim=0)) == 8 for grid in got[-1])  # 16 patches share 8 tokens


@torch.inference_mode()
def test_tome_logits_are_unchanged_by_the_tracking():
    model, x = apply_tome(tiny(), r=[3, 2, 2, 1]), images(2, 64)
    h, size = embed(model, x), None
    for blk, r in zip(model.blocks, model.blocks.r):
        h, size = pre_edit_block(blk, h, size, r)
    assert torch.equal(model(x), model.forward_head(model.norm(h)))
    tracked, size, owner = embed(model, x), None, torch.arange(1, 17).expand(2, -1)
    for blk, r in zip(model.blocks, model.blocks.r):
        tracked, size, owner = tracked_block(blk, tracked, size, r, owner)
    assert torch.equal(tracked, h)


def test_tome_intermediates_refuses_a_model_without_tome():
    with pytest.raises(TypeError, match="expected a model from apply_tome"):
        tome_intermediates(tiny(), images(1, 64), [0])


def test_tie_credit_counts_a_collapsed_grid_as_a_random_pick():
    similarity = torch.tensor([[0.1, 0.9, 0.9, 0.9], [0.8, 0.2, 0.1, 0.0]])
    assert dense_quality.tie_credit(similarity, torch.tensor([1, 0])) == pytest.approx(100 * (1 / 3 + 1) / 2)
    assert dense_quality.tie_credit(similarity, torch.tensor([0, 1])) == 0


def test_flip_correspondence_is_perfect_for_mirror_symmetric_distinct_features_and_chance_when_collapsed():
    features = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mirrored = features.reshape(2, 4, 4, 8).flip(2).reshape(2, 16, 8)
    assert dense_quality.flip_correspondence(features, mirrored) == 100
    same = torch.ones(2, 16, 8)
    assert dense_quality.flip_correspondence(same, same) == pytest.approx(100 / 16)
    assert dense_quality.pair_agreement(features, features) == 100


def test_foreground_segmentation_and_probe():
    attention = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    mask = dense_quality.foreground(attention)
    assert mask.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert dense_quality.segmentation(mask, mask) == (100, 100)
    miou, accuracy = dense_quality.segmentation(torch.ones_like(mask), mask)
    assert (miou, accuracy) == (25, 50)  # foreground IoU 4/8, background 0
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 6, generator=generator)
    target = features[:, 2] + 0.5 * features[:, 4] > 0.3
    probe = dense_quality.train_probe(features, target, steps=100)
    assert (probe(features) == target).float().mean() > 0.98


def test_pca_rgb_maps_into_the_unit_cube():
    reference = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    maps = dense_quality.pca_rgb(reference, [reference * 2, torch.zeros_like(reference)])
    assert [tuple(m.shape) for m in maps] == [(2, 16, 3)] * 3
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps)
    sheet = dense_quality.figure(torch.zeros(2, 3, 64, 64), maps, ["a", "b", "c"], panel=32)
    assert sheet.size == (4 * 32, 18 + 2 * 32)


def test_blocks_forward_tracks_nothing():
    model = apply_tome(tiny(), r=2)
    calls = []
    original = tome_baseline.follow
    tome_baseline.follow = lambda *args: calls.append(1) or original(*args)
    try:
        with torch.inference_mode():
            model(images(1, 64))
    finally:
        tome_baseline.follow = original
    assert calls == []
