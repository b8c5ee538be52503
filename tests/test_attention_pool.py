"""Attention-pooled timm ViTs (``global_pool='map'``: SigLIP, so400m): the probe of the head weighs a
fused or merged token as the tokens it stands for, ``log(size)`` added to its key logits. The shared
checks run on the SigLIP variant in test_families.py; here, the class-token variant and the head."""

from __future__ import annotations

import math

import pytest
import torch
from cases import small_map
from conftest import images, make_vit
from reference import reference_probe_attention, reference_timm_attention_pool
from tracked import NoSizeBias, check_keep_one_is_exact, check_matches_reference

import evit_patch
from evit_patch.errors import UnsupportedModelError
from evit_patch.token_state import PoolSizeBias, pack


def test_class_token_variant_matches_reference():
    """A class token, sliced off before the pool."""
    check_matches_reference("vit", small_map("cls_map"), images(2, size=64), [1, 2], [0.6, 0.5])


def test_head_with_an_explicit_softmax_matches_reference():
    """timm's non-fused path: log(size) is added to the logits before the head's softmax."""
    model = small_map()
    model.attn_pool.fused_attn = False
    check_matches_reference("vit", model, images(2, size=64), [1, 2], [0.6, 0.5], method="merge")


def test_class_token_variant_keep_one_is_exact():
    check_keep_one_is_exact(small_map("cls_map", torch.float32), images(2, size=64, dtype=torch.float32))


def test_probe_weighs_a_token_as_its_size():
    """The key bias is exactly log(size) (per head and query in nn.MultiheadAttention's layout), and
    the pooled output equals the explicit probe attention over sizes, which a token of size s
    reproduces as s copies of itself."""
    sizes = torch.tensor([[1.0, 3.0, 1.0, 7.0], [2.0, 1.0, 5.0, 1.0]], dtype=torch.float64)
    q = torch.zeros(2, 4, 1, 8, dtype=torch.float64)
    torch.testing.assert_close(PoolSizeBias(0)(sizes, q), sizes.log()[:, None, None, :], rtol=0, atol=0)
    mask = PoolSizeBias(1, num_heads=4)(sizes, torch.zeros(2, 3, 8, dtype=torch.float64))
    assert mask.shape == (2 * 4, 3, 5)
    torch.testing.assert_close(mask[5, 2], torch.tensor([0.0, math.log(2), 0, math.log(5), 0], dtype=torch.float64))
    assert PoolSizeBias(0)(None, q) is None

    model = small_map()
    fast = evit_patch.apply(model, layers=[1], keep=0.5)
    x = torch.randn(2, 4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    packed = pack(x, torch.arange(4).expand(2, -1), sizes, 0)
    with torch.no_grad():
        got = fast.attn_pool(packed)
        for b in range(2):
            want = reference_timm_attention_pool(model.attn_pool, x[b], sizes[b].tolist())
            torch.testing.assert_close(got[b], want, rtol=0, atol=1e-12)
        copies = x[1, [0, 0, 1, 2, 2, 2, 2, 2, 3]]  # sample 1's tokens repeated by their sizes
        torch.testing.assert_close(got[1], model.attn_pool(copies[None])[0], rtol=0, atol=1e-12)
        assert (got[1] - model.attn_pool(x[1:])[0]).abs().max() > 1e-3  # counted once each: different
    q, k, v = (torch.randn(1, 2, 3, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(reference_probe_attention(q, k, v, [5], 1.0), v.reshape(1, -1))  # one key: weight 1


def test_size_awareness_changes_the_embedding():
    """With the bias switched off the head counts a fused token once: a different output."""
    model, x = small_map(), images(2, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    with torch.no_grad():
        weighted = fast(x)
        fast.attn_pool.evit_bias = NoSizeBias()
        assert (fast(x) - weighted).abs().max() > 1e-3


def test_features_have_the_librarys_width_and_the_head_its_state():
    """forward_features returns the normed tokens at the library's width; forward hands the head the
    state it weighs the tokens by (the size-weighted reference above)."""
    fast = evit_patch.apply(small_map(), layers=[1, 2], keep=0.5)
    assert fast.forward_features(images(1, size=64)).shape == (1, 6, 64)  # 16 -> 8 + 1 -> 5 + 1


def test_position_embedded_pool_is_refused():
    model = make_vit("vit_base_patch16_siglip_224", img_size=64, depth=2, embed_dim=64, num_heads=4)
    from timm.layers import AttentionPoolLatent

    model.attn_pool = AttentionPoolLatent(64, num_heads=4, feat_size=16, pos_embed="abs").double()
    with pytest.raises(
        UnsupportedModelError,
        match=r"^VisionTransformer \(vit_base_patch16_siglip_224\)\.attn_pool: expected timm's AttentionPoolLatent "
        r"without a position embedding \(global_pool='map'\), found AttentionPoolLatent with pos_embed='abs'$",
    ):
        evit_patch.apply(model)
