"""Average-pooled timm ViTs, with or without a class token: the received-attention score and
the size-weighted pool (the fused token counts as the tokens it stands for)."""

from __future__ import annotations

import pytest
import torch
from conftest import images, make_vit
from tracked import (
    PlainMean,
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
from evit_patch.options import Score
from evit_patch.scores import received_attention_from_qk
from evit_patch.token_state import pool_weights

VARIANTS = {
    "gap": dict(class_token=False, global_pool="avg", fc_norm=False),  # vit_*_gap_*: norm, then mean
    "registers_gap": dict(class_token=False, reg_tokens=4, global_pool="avg"),  # fc_norm after the mean
    "cls_avg": dict(global_pool="avg"),  # a class token, yet an average-pooled head
}


def _small(variant="gap", dtype=torch.float64):
    options = dict(img_size=64, depth=4, embed_dim=64, num_heads=4, num_classes=10) | VARIANTS[variant]
    return randomise(make_vit("vit_base_patch16_224", dtype=dtype, **options))


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(variant, fuse):
    check_matches_reference("vit", _small(variant), images(3, size=64), [1, 2], [0.6, 0.5], fuse)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keep_one_is_exact(variant):
    check_keep_one_is_exact(_small(variant, torch.float32), images(2, size=64, dtype=torch.float32))


def test_score_follows_the_class_token():
    assert [r.score for r in evit_patch.reorganizers(evit_patch.apply(_small("gap"), layers=[1]))] == [Score.RECEIVED]
    assert [r.score for r in evit_patch.reorganizers(evit_patch.apply(_small("cls_avg"), layers=[1]))] == [Score.CLS]


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
    model, x = _small(), images(2, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    with torch.no_grad():
        weighted = fast(x)
        fast.norm.evit_pool = PlainMean()
        assert (fast(x) - weighted).abs().max() > 1e-3


def test_gradients_match_reference():
    check_gradients("vit", _small(), images(2, size=64))


def test_original_untouched_and_state_dict_keys_kept():
    check_original_untouched(_small())


@pytest.mark.parametrize("variant", ["gap", "cls_avg"])
def test_explain_equals_counted_macs(variant):
    """The received score costs a full q k^T at each reorganizing block; explain counts it."""
    check_macs(_small(variant), images(1, size=64))


def test_concurrent_calls():
    check_threads(_small(), images(2, size=64))


def test_fullgraph_compile_matches_eager():
    from tracked import check_compile

    check_compile(_small(dtype=torch.float32), images(2, size=64))


def test_export_matches_eager():
    check_export(_small(), images(3, size=64))


def test_gradient_checkpointing():
    check_gradient_checkpointing(_small(), images(2, size=64))
