"""Average-pooled timm ViTs, with or without a class token: the received-attention score and
the size-weighted pool (the fused token counts as the tokens it stands for). The shared checks run on
the class-token-less variant in test_families.py; here, the others."""

from __future__ import annotations

import pytest
import torch
from cases import GAP_VARIANTS, small_gap
from conftest import images
from tracked import PlainMean, check_keep_one_is_exact, check_macs, check_matches_reference

import evit_patch
from evit_patch.options import Score
from evit_patch.scores import received_attention_from_qk
from evit_patch.token_state import pool_weights


@pytest.mark.parametrize(
    "variant, fuse",
    [(v, fuse) for v in GAP_VARIANTS for fuse in (True, False) if (v, fuse) != ("gap", True)],  # gap: the table
)
def test_matches_reference(variant, fuse):
    check_matches_reference("vit", small_gap(variant), images(3, size=64), [1, 2], [0.6, 0.5], fuse)


@pytest.mark.parametrize("variant", ["registers_gap", "cls_avg"])
def test_keep_one_is_exact(variant):
    check_keep_one_is_exact(small_gap(variant, torch.float32), images(2, size=64, dtype=torch.float32))


def test_score_follows_the_class_token():
    for variant, score in (("gap", Score.RECEIVED), ("cls_avg", Score.CLS)):
        assert [r.score for r in evit_patch.reorganizers(evit_patch.apply(small_gap(variant), layers=[1]))] == [score]


def test_received_attention_is_the_column_mean_of_the_map():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 7, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(1, 3, 7, 7, generator=gen, dtype=torch.float64)
    probs = (q @ k.transpose(-2, -1) / 2 + bias).softmax(-1)
    want = torch.stack([probs[b, :, :, 2:].mean(dim=(0, 1)) for b in range(2)])
    torch.testing.assert_close(received_attention_from_qk(q, k, 2, None, bias), want, rtol=0, atol=1e-15)
    assert torch.allclose(received_attention_from_qk(q, k, 0).sum(-1), torch.ones(2, dtype=torch.float64))


def test_pool_weights_turn_a_plain_mean_into_the_size_weighted_mean():
    x = torch.randn(2, 1 + 4, 3, dtype=torch.float64)
    sizes = torch.tensor([[1.0, 1.0, 2.0, 5.0], [3.0, 1.0, 1.0, 4.0]], dtype=torch.float64)
    got = (x * pool_weights(sizes, 1))[:, 1:].mean(dim=1)
    want = (x[:, 1:] * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_fused_token_counts_as_the_tokens_it_stands_for():
    """Without the weights the average treats the fused token as one token: a different output."""
    model, x = small_gap(), images(2, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    with torch.no_grad():
        weighted = fast(x)
        fast.norm.evit_pool = PlainMean()
        assert (fast(x) - weighted).abs().max() > 1e-3


def test_explain_equals_counted_macs_with_a_class_token():
    """The [CLS] score where the head averages: the received score (no class token) is the table's."""
    check_macs(small_gap("cls_avg"), images(1, size=64))
