"""Attention-pooled timm ViTs (``global_pool='map'``: SigLIP, so400m): the probe of the head weighs a
fused or merged token as the tokens it stands for, ``log(size)`` added to its key logits."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from conftest import images, make_vit
from reference import reference_probe_attention, reference_timm_attention_pool
from tracked import (
    NoSizeBias,
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
from evit_patch.errors import UnsupportedModelError
from evit_patch.token_state import PoolSizeBias, pack

VARIANTS = {
    "siglip": ("vit_base_patch16_siglip_224", {}),  # no class token: received-attention score
    "cls_map": ("vit_base_patch16_224", dict(global_pool="map")),  # a class token, sliced off before the pool
}


def _small(variant="siglip", dtype=torch.float64):
    name, options = VARIANTS[variant]
    options = dict(img_size=64, depth=4, embed_dim=64, num_heads=4, num_classes=10) | options
    model = randomise(make_vit(name, dtype=dtype, **options))
    with torch.no_grad():  # the probe at a scale where its softmax is far from uniform
        model.attn_pool.latent.normal_(0, 1.0)
        model.attn_pool.kv.weight.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("variant, method", [("siglip", "evit"), ("siglip", "merge"), ("cls_map", "evit")])
def test_matches_reference(variant, method):
    check_matches_reference("vit", _small(variant), images(2, size=64), [1, 2], [0.6, 0.5], method=method)


def test_head_with_an_explicit_softmax_matches_reference():
    """timm's non-fused path: log(size) is added to the logits before the head's softmax."""
    model = _small()
    model.attn_pool.fused_attn = False
    check_matches_reference("vit", model, images(2, size=64), [1, 2], [0.6, 0.5], method="merge")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keep_one_is_exact(variant):
    check_keep_one_is_exact(_small(variant, torch.float32), images(2, size=64, dtype=torch.float32))


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

    model = _small()
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
    model, x = _small(), images(2, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    with torch.no_grad():
        weighted = fast(x)
        fast.attn_pool.evit_bias = NoSizeBias()
        assert (fast(x) - weighted).abs().max() > 1e-3


def test_gradients_match_reference():
    check_gradients("vit", _small(), images(2, size=64))


def test_original_untouched_and_state_dict_keys_kept():
    check_original_untouched(_small())


@pytest.mark.parametrize("method", ["evit", "merge"])
def test_explain_equals_counted_macs(method):
    """The head's keys and values shrink with the final token count; explain counts them. (Without
    gradients: FlopCounterMode's module hooks fail on timm's ``latent.expand`` under no_grad.)"""
    check_macs(_small().requires_grad_(False), images(1, size=64), method=method)


def test_concurrent_calls():
    check_threads(_small(), images(2, size=64))


def test_fullgraph_compile_matches_eager():
    check_compile(_small(dtype=torch.float32), images(2, size=64))


def test_export_matches_eager():
    check_export(_small(), images(3, size=64))


def test_gradient_checkpointing():
    check_gradient_checkpointing(_small(), images(2, size=64))


def test_pickle_round_trip():
    fast = evit_patch.apply(_small(), layers=[1, 2], keep=0.5, method="merge")
    x = images(2, size=64)
    with torch.no_grad():
        torch.testing.assert_close(pickle.loads(pickle.dumps(fast))(x), fast(x), rtol=0, atol=0)


def test_features_have_the_librarys_width_and_the_head_its_state():
    """forward_features returns the normed tokens at the library's width; forward hands the head the
    state it weighs the tokens by (the size-weighted reference above)."""
    fast = evit_patch.apply(_small(), layers=[1, 2], keep=0.5)
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
