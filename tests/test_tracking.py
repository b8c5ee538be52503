"""``track_tokens`` against the patched model's own internals: what each reorganizer outputs, and
what the tokens are when the blocks leave them unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import images, make_vit

import evit_patch
from evit_patch.analysis.tracking import PatchStatus, patch_grid, track_tokens
from evit_patch.errors import InvalidPlanError, UnsupportedInputError

pytestmark = pytest.mark.xdist_group("tracking")  # one worker: the module fixture is built once


@pytest.fixture(scope="module")
def model():
    return make_vit()  # apply copies it, so tests can share it


def _record(fast, x):
    """The reorganizers' real inputs and outputs, the tokens entering block 0 and the final norm."""
    seen = {}

    def keep(key, value):  # hooks must return None, or they replace what they saw
        seen[key] = value

    handles = [
        m.register_forward_hook(lambda mod, args, out: keep(mod.layer, (args[0], out)))
        for m in evit_patch.reorganizers(fast)
    ]
    handles.append(fast.blocks[0].register_forward_pre_hook(lambda mod, args: keep("first", args[0])))
    handles.append(fast.norm.register_forward_pre_hook(lambda mod, args: keep("last", args[0])))
    with torch.no_grad():
        logits = fast(x)
    for h in handles:
        h.remove()
    return logits, seen


def _expected_output(x_in, stage, prefix):
    """The reorganizer output rebuilt by hand from its input and the tracked kept indices."""
    image = x_in[:, prefix:]
    kept = torch.stack([image[b, stage.kept_index[b]] for b in range(len(image))])
    parts = [x_in[:, :prefix], kept]
    if stage.fused:
        dropped = torch.ones_like(stage.scores, dtype=torch.bool).scatter(1, stage.kept_index, False)
        fused = [
            (stage.scores[b, dropped[b], None].to(image.dtype) * image[b, dropped[b]]).sum(0) for b in range(len(image))
        ]
        parts.append(torch.stack(fused)[:, None])
    return torch.cat(parts, 1)


def _check_against_model(fast, x, atol):
    trace = track_tokens(fast, x)
    logits, seen = _record(fast, x)
    assert torch.equal(trace.logits, logits)
    assert [s.layer for s in trace.stages] == [m.layer for m in evit_patch.reorganizers(fast)]
    prefix = trace.num_prefix_tokens
    for stage in trace.stages:
        x_in, out = seen[stage.layer]
        torch.testing.assert_close(out, _expected_output(x_in, stage, prefix), rtol=0, atol=atol)
        assert out.shape[1] == prefix + stage.origin.shape[1] == prefix + stage.members.shape[1]
        if stage.kept_index.shape == stage.scores.shape:  # a no-op stage keeps every token in place
            assert torch.equal(out, x_in) and torch.equal(stage.kept_index[0], torch.arange(len(stage.kept_index[0])))
            continue
        # kept_index is the top-k by score, in descending order
        kept_scores = stage.scores.gather(1, stage.kept_index)
        assert (kept_scores[:, :-1] >= kept_scores[:, 1:]).all()
        dropped = stage.scores.scatter(1, stage.kept_index, -1.0)
        assert (kept_scores[:, -1] >= dropped.max(1).values).all()
    assert seen["last"].shape[1] == prefix + trace.stages[-1].origin.shape[1]
    return trace, seen


def test_tracked_indices_rebuild_every_reorganizer_output(model):
    fast = evit_patch.apply(model, layers=[3, 6, 9], keep=[0.7, 0.6, 0.5])
    trace, _ = _check_against_model(fast, images(3), atol=1e-12)
    assert [s.kept_index.shape for s in trace.stages] == [(3, 138), (3, 84), (3, 43)]
    assert trace.grid == (14, 14)


def test_composed_indices_follow_each_token_to_its_patches(model):
    """With attention and MLP outputs zeroed, blocks pass tokens through unchanged, yet the [CLS]
    scores still re-order and fuse them: every token must then equal the tracked patches
    weighted by the tracked fusion weights, across stages."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        for linear in (block.attn.proj, block.mlp.fc2):
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)
    fast = evit_patch.apply(model, layers=[1, 3, 5, 7, 9], keep=[0.6, 0.6, 1.0, 0.6, 0.6])
    trace, seen = _check_against_model(fast, images(4), atol=1e-12)
    prefix = trace.num_prefix_tokens
    patches = seen["first"][:, prefix:]
    kept_earlier_fused = refused = 0
    for i, stage in enumerate(trace.stages):
        out = seen[stage.layer][1][:, prefix:]
        torch.testing.assert_close(out, stage.weights.to(patches.dtype) @ patches, rtol=0, atol=1e-12)
        single = stage.origin >= 0
        gathered = patches.gather(1, stage.origin.clamp(min=0)[..., None].expand_as(out))
        assert torch.equal(out[single], gathered[single])  # tokens still their own patch: exact
        assert torch.equal(stage.members, stage.weights != 0)
        assert torch.equal(single, ~stage.is_fused) and torch.equal(
            stage.members.sum(-1)[single], torch.ones_like(out[..., 0], dtype=torch.long)[single]
        )
        assert (stage.members.sum(1) == 1).all()  # with fusion every patch is in exactly one token
        if i > 0:
            before = trace.stages[i - 1].is_fused.sum()
            still = stage.is_fused[:, :-1].sum() if stage.fused else stage.is_fused.sum()
            kept_earlier_fused += int(still)
            refused += int(before - still)
    assert trace.stages[2].kept_index.shape[1] == trace.stages[1].origin.shape[1] and not trace.stages[2].fused
    assert kept_earlier_fused > 0 and refused > 0  # both fates of a fused token were exercised


def test_patch_status_and_attention_per_patch(model):
    fast = evit_patch.apply(model, layers=[3, 6, 9], keep=0.7)
    trace = track_tokens(fast, images(2))
    for i, stage in enumerate(trace.stages):
        status = stage.patch_status()
        row = stage.members.to(torch.uint8).argmax(1)
        last = stage.members.shape[1] - 1
        assert torch.equal(status == PatchStatus.KEPT, stage.origin.gather(1, row) >= 0)
        assert torch.equal(status == PatchStatus.FUSED_HERE, row == last)
        assert torch.equal(status == PatchStatus.FUSED_EARLIER, stage.is_fused.gather(1, row) & (row != last))
        assert int((status == PatchStatus.KEPT).sum()) == 2 * stage.kept_index.shape[1] - int(
            stage.is_fused[:, :-1].sum()
        )
        # spreading each token's score over its patches keeps the total attention
        torch.testing.assert_close(trace.patch_attention(i).sum(-1), stage.scores.sum(-1), rtol=0, atol=1e-12)


def test_without_fusion_dropped_patches_belong_to_no_token(model):
    fast = evit_patch.apply(model, layers=[3, 6, 9], keep=0.7, fuse=False)
    trace, _ = _check_against_model(fast, images(2), atol=0)
    last = trace.stages[-1]
    assert not last.is_fused.any() and (last.origin >= 0).all()
    status = last.patch_status()
    # ceil(0.7 * n) three times, with no fused token: 196 -> 138 -> 97 -> 68
    assert torch.equal((status == PatchStatus.KEPT).sum(1), torch.tensor([68, 68]))
    assert torch.equal((status == PatchStatus.DROPPED).sum(1), torch.tensor([196 - 68] * 2))
    assert torch.equal(status.gather(1, last.origin), torch.full_like(last.origin, PatchStatus.KEPT))


def test_any_image_size_and_prefix_tokens():
    """A dynamic-size model at 160x224 (a 10x14 grid) with a distillation token."""
    model = make_vit("deit_tiny_distilled_patch16_224", dynamic_img_size=True)
    fast = evit_patch.apply(model, layers=[2, 8], keep=0.5)
    x = images(2, 224)[:, :, :160]
    trace, _ = _check_against_model(fast, x, atol=1e-12)
    assert trace.grid == (10, 14) and trace.num_prefix_tokens == 2
    assert [s.kept_index.shape[1] for s in trace.stages] == [70, 36]


def test_track_tokens_refuses_unpatched_models_and_unknown_grids(model):
    with pytest.raises(
        InvalidPlanError,
        match=r"^track_tokens: VisionTransformer \(deit_tiny_patch16_224\) is not an evit_patch model; "
        r"call evit_patch.apply first$",
    ):
        track_tokens(model, images(1))
    with pytest.raises(
        UnsupportedInputError,
        match=r"^track_tokens: cannot lay out the 100 image tokens of VisionTransformer \(deit_tiny_patch16_224\) "
        r"on a patch grid for a \(224, 224\) image \(patch grid: \(14, 14\)\); expected a 2-D patch embedding$",
    ):
        patch_grid(model, (224, 224), 100)


def test_real_deit_tiny_tracking_matches_its_reorganizers(real_model, real_val_images):
    x, _ = real_val_images
    fast = evit_patch.apply(real_model, layers=[3, 6, 9], keep=0.7)
    trace, _ = _check_against_model(fast, x[:4], atol=1e-5)
    assert [s.origin.shape[1] for s in trace.stages] == [139, 99, 71]


@pytest.mark.parametrize("library", ["torchvision", "transformers"])
def test_other_libraries_are_tracked_and_drawn(library):
    """The patch grid comes from the model's family, so torchvision and Hugging Face models are
    tracked and visualised like timm's."""
    pytest.importorskip("transformers" if library == "transformers" else "torchvision")
    from cases import small_hf, small_torchvision

    model = (small_torchvision if library == "torchvision" else small_hf)()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    trace = track_tokens(fast, images(2, 64))
    assert trace.grid == (8, 8)
    for stage in trace.stages:  # every patch in exactly one token (EViT fuses, so none is lost)
        assert torch.equal(stage.members.sum(1), torch.ones(2, 64, dtype=torch.long))
    assert evit_patch.visualize(fast, images(1, 64).clamp(-2, 2)).size[0] > 0
