"""The pipeline's verify step, and its one-trace promise: apply checks the traced token counts
against the analytic plan, and apply/plan/calibrate trace each block once."""

from __future__ import annotations

import pytest
import timm
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_leaves

import evit_patch
from evit_patch import pipeline
from evit_patch.errors import VerificationError
from evit_patch.graph import profile as profile_module
from evit_patch.graph import verify as verify_module
from evit_patch.graph.cost import BlockCost
from evit_patch.graph.verify import verify_token_counts


def _tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, **kwargs).eval()


@pytest.mark.parametrize("real", [True, False], ids=["real", "fake"])
def test_counts_that_disagree_with_the_plan_are_refused_by_block(monkeypatch, real):
    """An accounting that counts one token too many from block 1 on is caught at block 2, whether the
    check runs a real image (a small float32 model on the CPU) or a fake one (a threshold of 0)."""
    if not real:
        monkeypatch.setattr(verify_module, "REAL_RUN_MACS", 0)
    model = _tiny()
    assert verify_module.runs_cheaply(model, 20_000_000) is real
    honest = BlockCost.tokens_out

    def one_too_many(self, tokens_in, keep, reduction, prefix_only=False):
        return honest(self, tokens_in, keep, reduction, prefix_only) + (keep is not None)

    monkeypatch.setattr(BlockCost, "tokens_out", one_too_many)
    with pytest.raises(VerificationError) as info:
        evit_patch.apply(model, layers=[1], keep=0.5)
    # 16 patches + [CLS] -> keep 8 + fused + [CLS] = 10 tokens; the lying plan says 11.
    assert str(info.value) == (
        "VisionTransformer (vit_tiny_patch16_224).blocks.2: the patched graph feeds this block 10 tokens, "
        "the plan (explain) says 11; please report this as an evit_patch bug"
    )


@pytest.mark.parametrize("method", ["evit", "merge"])
def test_verified_counts_are_the_explain_rows_and_no_hook_is_left(method):
    model = _tiny()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method=method)
    rows = evit_patch.explain(fast).rows
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in fast.blocks]
    with torch.no_grad():
        fast(torch.randn(2, 3, 64, 64))
    expected = {"evit": [17, 17, 10, 7], "merge": [17, 17, 9, 5]}[method]
    assert seen == [r.tokens_in for r in rows] == expected
    for hook in hooks:
        hook.remove()
    assert all(not b._forward_pre_hooks for b in fast.blocks)
    family = evit_patch.families.find_family(fast)
    modes = [m.training for m in fast.modules()]
    for real in (False, True):
        output = verify_token_counts(fast, family, [r.tokens_in for r in rows], real=real)
        assert output.shape == (1, 1000) and isinstance(output, FakeTensor) is not real
        with pytest.raises(
            VerificationError, match=rf"blocks\.3: the patched graph feeds this block {expected[3]} tok"
        ):
            verify_token_counts(fast, family, [*expected[:3], expected[3] + 1], real=real)
    assert [m.training for m in fast.modules()] == modes  # a real check runs in eval mode, then puts them back


def test_a_real_check_runs_only_where_it_is_cheaper_and_changes_nothing():
    model = _tiny()
    assert verify_module.runs_cheaply(model, verify_module.REAL_RUN_MACS - 1)
    assert not verify_module.runs_cheaply(model, verify_module.REAL_RUN_MACS)  # large: faked
    assert not verify_module.runs_cheaply(_tiny().to(torch.bfloat16), 1)  # 16-bit CPU kernels are slow
    assert not verify_module.runs_cheaply(_tiny().to("meta"), 1)  # nothing to run
    fast = evit_patch.apply(model.train(), layers=[1], keep=0.5)  # checked in eval mode, then put back
    assert all(m.training for m in fast.modules())
    fast = evit_patch.apply(model.eval(), layers=[1], keep=0.5, method="dam")  # inserted modules too
    assert not any(m.training for m in fast.modules())


def _count_traces(monkeypatch):
    calls = []
    real = profile_module.trace_blocks

    def spy(model, family, *args):
        calls.append(type(model).__name__)
        return real(model, family, *args)

    monkeypatch.setattr(profile_module, "trace_blocks", spy)
    monkeypatch.setattr(pipeline, "trace_blocks", spy)
    return calls


@pytest.mark.parametrize(
    "kwargs",
    [dict(layers=[1], keep=0.7), dict(flops=0.7), dict(flops=0.5, img_size=48), dict(flops=0.6, method="merge")],
    ids=["keep", "flops", "flops+img_size", "merge"],
)
def test_apply_traces_each_block_once(monkeypatch, kwargs):
    calls = _count_traces(monkeypatch)
    evit_patch.apply(_tiny(), **kwargs)
    assert calls == ["VisionTransformer"]


def test_resized_budget_is_a_fraction_of_the_native_cost():
    """flops= with img_size= budgets against the original at its own size (no second trace needed)."""
    model = _tiny()
    fast = evit_patch.apply(model, flops=1.0, img_size=96)
    native = evit_patch.explain(evit_patch.apply(model, keep=1.0, layers=[1])).macs_original
    assert evit_patch.explain(fast).macs_patched <= native < evit_patch.explain(fast).macs_original


def test_plan_and_calibrate_trace_once(monkeypatch):
    calls = _count_traces(monkeypatch)
    model = _tiny()
    evit_patch.plan(model, flops=0.7)
    assert calls == ["VisionTransformer"]
    calls.clear()
    evit_patch.calibrate(model, torch.randn(4, 3, 64, 64), flops=0.7, max_evaluations=3, progress=False)
    assert calls == ["VisionTransformer"]


def test_repeated_blocks_share_one_shape_propagation_and_get_its_shapes(monkeypatch):
    """Blocks alike in graph, settings and shapes are run on fake tensors once; each gets the shapes
    its own run would give. A block with the same weights but another head count is run again."""
    runs = []
    propagate = profile_module._propagate_shapes
    counted = lambda gm, *args, **kwargs: runs.append(gm) or propagate(gm, *args, **kwargs)  # noqa: E731
    monkeypatch.setattr(profile_module, "_propagate_shapes", counted)
    model = _tiny()
    model.blocks[3].attn.num_heads, model.blocks[3].attn.head_dim = 1, 192  # same weights, other inner shapes
    family = profile_module.find_family(model)
    traced = profile_module.trace_blocks(model, family)
    assert [t.name for t in traced] == [f"blocks.{i}" for i in range(4)] and len(runs) == 2
    for index in (1, 3):
        shared = [n.meta.get("val") for n in traced[index].graph_module.graph.nodes]
        propagate(traced[index].graph_module, model.blocks[index], [], FakeTensorMode(allow_non_fake_inputs=True),
                  where="x", tokens=family.num_tokens(model), channels=family.channels(model))  # fmt: skip
        fresh = [n.meta.get("val") for n in traced[index].graph_module.graph.nodes]
        shapes = [[tuple(v.shape) for v in tree_leaves(x) if isinstance(v, torch.Tensor)] for x in (shared, fresh)]
        assert shapes[0] == shapes[1] and len(shapes[0]) > 20
    heads = [tuple(n.meta["val"].shape) for n in traced[3].graph_module.graph.nodes if n.name == "permute"]
    assert heads == [(3, 1, 1, 17, 192)]
