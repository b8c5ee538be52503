"""Every registered reduction method against what it declares: the tokens it makes are its own
declared mix, its survivor count is what the block produced, sizes partition the patches, and a
model patched with it counts the MACs ``FlopCounterMode`` counts. A new method passes these by
being registered; the docs' toy method is run as written."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import images, make_vit
from tracked import check_keep_one_is_exact, check_macs

import evit_patch
from evit_patch import InvalidPlanError, PlanOptions, Pool
from evit_patch.reductions import (
    DAM,
    EViT,
    Merge,
    Mix,
    destination,
    follow,
    list_reductions,
    mix_tokens,
    mixing,
    num_kept,
    reduction_class,
)
from evit_patch.reductions import registry as registry_module

ROOT = Path(__file__).resolve().parents[1]

CONFIGURED = {  # every built-in method in each configuration a patched model can give it
    "evit": EViT(),
    "evit_nofuse": EViT(fuse=False),
    "evit_mean": EViT(mean=True),
    "merge": Merge(),
    "dam": DAM(),
}


def _case(seed=0, batch=3, prefix=1, num_image=12, channels=5, whole_sizes=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, prefix + num_image, channels, generator=gen, dtype=torch.float64)
    scores = torch.rand(batch, num_image, generator=gen, dtype=torch.float64)
    keys = torch.randn(batch, prefix + num_image, 4, generator=gen, dtype=torch.float64)
    sizes = torch.randint(1, 5, (batch, num_image), generator=gen).to(torch.float64)
    return x, scores, keys, sizes


def test_every_registered_method_is_checked_here():
    assert set(list_reductions()) >= {"evit", "merge", "dam"}
    assert {type(r).name for r in CONFIGURED.values()} == set(list_reductions())


@pytest.mark.parametrize("name", list(CONFIGURED))
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_tokens_are_the_declared_mix(name, keep, prefix):
    reduction = CONFIGURED[name]
    x, scores, keys, sizes = _case(prefix=prefix)
    num_image = scores.shape[1]
    num_keep = num_kept(num_image, keep)
    tokens, mix = reduction(x, scores, keys=keys, sizes=sizes, num_prefix=prefix, num_keep=num_keep)
    weights, members = mixing(mix, num_image)
    assert tokens.shape == (3, prefix + reduction.tokens_after(num_image, keep), 5)
    assert torch.equal(tokens[:, :prefix], x[:, :prefix])
    torch.testing.assert_close(tokens[:, prefix:], weights @ x[:, prefix:], rtol=0, atol=1e-12)
    # Tokens stand for disjoint sets of patches; with a rest token or merging, for all of them.
    per_patch = members.sum(1)
    assert per_patch.max() <= 1
    if mix.rest is not None or mix.moved is not None:
        assert (per_patch == 1).all()
    positions, new_sizes = follow(None, sizes, mix, num_image)
    torch.testing.assert_close(new_sizes, (members.double() @ sizes.unsqueeze(-1)).squeeze(-1), rtol=0, atol=0)
    assert torch.equal(positions[:, : mix.kept.shape[1]], mix.kept)


@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("rest", [False, True])
def test_a_mix_that_merges_some_tokens_and_drops_or_fuses_others(mean, rest):
    """Every kind of entering token in one mix (led, joined, fused or dropped), which no built-in
    method makes: the tokens are the declared mix, every derived quantity agrees with it, and no
    gradient is lost or made NaN by the tokens that join no kept token."""
    x, scores, _, sizes = _case(prefix=1)
    x.requires_grad_(True)
    order = scores.argsort(dim=1, descending=True)
    kept, moved = order[:, :4], order[:, 4:8]  # the last 4 of 12 are fused into the rest, or dropped
    into = torch.tensor([[0, 3, 3, 1], [2, 2, 0, 0], [1, 1, 1, 1]])
    fused = scores.scatter(1, order[:, :8], 0.0) if rest else None
    # A weight on a token that joins no kept token is read by nothing: zero here, as a method may leave it.
    weight = sizes.scatter(1, order[:, 8:], 0.0)
    mix = Mix(kept, moved, into, weight=weight, rest=fused, mean=mean)
    weights, members = mixing(mix, 12)
    tokens = mix_tokens(x, mix, 1)
    torch.testing.assert_close(tokens[:, 1:], weights @ x[:, 1:], rtol=0, atol=1e-12)
    torch.testing.assert_close(tokens[:, :1], x[:, :1], rtol=0, atol=0)
    dest = destination(mix, 12)
    expected = torch.where(members.any(1), members.double().argmax(1), -1)
    assert torch.equal(dest, expected)
    _, new_sizes = follow(None, sizes, mix, 12)
    torch.testing.assert_close(new_sizes, (members.double() @ sizes.unsqueeze(-1)).squeeze(-1), rtol=0, atol=0)
    tokens.sum().backward()
    reference = (weights.sum(1).unsqueeze(-1)).expand(-1, -1, 5)  # d(sum of tokens)/dx_j: its total weight
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad[:, 1:], reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["evit", "merge", "dam"])
def test_a_keep_rate_that_keeps_everything_reports_no_reduction(name):
    reduction = CONFIGURED[name]
    assert not reduction.drops(196, 1.0) and not reduction.drops(196, 0.999)
    assert reduction.tokens_after(196, 1.0) == 196 and reduction.tokens_after(196, None) == 196
    assert reduction.tokens_after(196, 0.7) == math.ceil(0.7 * 196) + reduction.extra_tokens


@pytest.mark.parametrize("method", ["evit", "merge", "dam"])
def test_patched_models_are_exact_at_keep_one_and_count_their_macs(method):
    model = make_vit(img_size=64, depth=4, num_classes=10)
    check_keep_one_is_exact(model, images(2, 64), method=method)
    check_macs(model, images(1, 64), method=method)


def test_options_a_method_does_not_honour_are_refused():
    with pytest.raises(InvalidPlanError, match=r"fuse=False applies to method='evit' only; method='merge' keeps no"):
        evit_patch.apply(make_vit(img_size=64, depth=4), keep=0.5, layers=[1], method="merge", fuse=False)
    with pytest.raises(InvalidPlanError, match=r"^x: method must be one of 'evit', 'merge'.*, got 'mrege'$"):
        PlanOptions.build(method="mrege", where="x")


def test_configured_instances_follow_the_head():
    options = PlanOptions.build(method="evit")
    assert options.reduction(Pool.TOKEN).mean is False and options.reduction(Pool.AVG).mean is True
    assert isinstance(PlanOptions.build(method="merge").reduction(Pool.TOKEN), Merge)
    assert reduction_class("merge").proportional and not reduction_class("evit").proportional


@pytest.fixture
def scratch_registry():
    """Registrations made in a test are undone after it."""
    saved = dict(registry_module._REDUCTIONS)
    yield
    registry_module._REDUCTIONS.clear()
    registry_module._REDUCTIONS.update(saved)


def test_the_documented_toy_method_runs(scratch_registry, capsys):
    """docs/adding-a-method.md, its code blocks executed as written: one file makes a method that
    apply, explain and plan accept, and that passes the generic checks above."""
    text = (ROOT / "docs" / "adding-a-method.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "adding-a-method.md", "exec"), namespace)
    assert "random" in list_reductions()
    explained = capsys.readouterr().out
    assert "method=random" in explained
    rows = evit_patch.explain(namespace["fast"]).rows
    assert [r.tokens_out - 1 for r in rows] == [16, 8, 4, 4]
    assert namespace["config"].method == "random"
    toy = reduction_class("random")()
    x, scores, keys, sizes = _case()
    tokens, mix = toy(x, scores, keys=keys, sizes=sizes, num_prefix=1, num_keep=6)
    weights, _ = mixing(mix, 12)
    torch.testing.assert_close(tokens[:, 1:], weights @ x[:, 1:], rtol=0, atol=0)
    with torch.no_grad():
        out = namespace["fast"](images(2, 64, dtype=torch.float32))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
