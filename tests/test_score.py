"""``score=``: EViT's [CLS] attention, or the attention each token receives (models with or
without a class token), through apply, budgets, explain, save/load and the CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import images, make_vit
from reference import reference_forward_tracked
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import evit_patch


def _small(**kwargs):
    return make_vit("deit_tiny_patch16_224", img_size=64, depth=4, **kwargs)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_received_score_on_a_class_token_model_matches_reference(pool):
    model, x = _small(global_pool=pool), images(3, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, score="received")
    with torch.no_grad():
        got, want = fast(x), reference_forward_tracked("vit", model, x, [1, 2], 0.5, score="received")
        cls = evit_patch.apply(model, layers=[1, 2], keep=0.5)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert (got - cls).abs().max() > 1e-3  # a different ranking, not the default
    assert evit_patch.get_config(fast).score == "received"


def test_explain_counts_the_received_score():
    model = _small()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, score="received")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fast(images(1, size=64))
    report = evit_patch.explain(fast)
    assert counter.get_total_flops() // 2 == report.macs_patched
    assert report.macs_patched > evit_patch.explain(evit_patch.apply(model, layers=[1, 2], keep=0.5)).macs_patched


def test_budget_plans_with_the_received_score_cost():
    model = _small()
    fast = evit_patch.apply(model, flops=0.7, score="received")
    report = evit_patch.explain(fast)
    assert report.macs_patched <= 0.7 * report.macs_original
    assert evit_patch.get_config(fast).score == "received"


def test_cls_score_without_a_class_token_is_refused():
    model = _small(class_token=False, global_pool="avg")
    with pytest.raises(evit_patch.InvalidPlanError, match=r"has no class token: score='cls' needs one"):
        evit_patch.apply(model, layers=[1], keep=0.7, score="cls")


def test_unknown_score_is_refused():
    message = r"score must be one of 'cls', 'received' or None, got 'norm'"
    with pytest.raises(evit_patch.InvalidPlanError, match=message):
        evit_patch.apply(_small(), layers=[1], keep=0.7, score="norm")


def test_score_survives_save_and_load(tmp_path):
    fast = evit_patch.apply(make_vit("deit_tiny_patch16_224"), layers=[3, 6], keep=0.6, score="received")
    evit_patch.save_pretrained(fast, tmp_path)
    loaded = evit_patch.load_pretrained(tmp_path)
    assert evit_patch.get_config(loaded) == evit_patch.get_config(fast)
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))


def test_cli_takes_a_score(capsys):
    from evit_patch.cli import main

    main(["explain", "--model", "deit_tiny_patch16_224", "--score", "received", "--keep", "0.5"])
    assert "GMACs" in capsys.readouterr().out
