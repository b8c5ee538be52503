"""Dense outputs: with ``dense=True`` every block's output restores to the full patch grid, through
:func:`evit_patch.restore` and the libraries' own interfaces (timm ``forward_intermediates`` /
``get_intermediate_layers``, transformers ``output_hidden_states`` and ``Dinov2Backbone``). Exact at
keep 1.0; each restored patch equals, by an independent reference (the tracked membership of every
token), the feature of the token that stands for it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from cases import (
    dinov2_images,
    open_clip_images,
    small_beit,
    small_eva,
    small_gap,
    small_hf_dinov2,
    small_map,
    small_open_clip,
    small_relpos,
    small_vit,
)
from conftest import images

import evit_patch
from evit_patch import token_state
from evit_patch.analysis.tracking import track_tokens
from evit_patch.errors import InvalidPlanError, UnsupportedInputError
from evit_patch.planning.objective import Objective
from evit_patch.planning.schedule import stops
from evit_patch.reductions import destination, list_reductions, mixing

transformers = pytest.importorskip("transformers")

METHODS = ("evit", "merge", "dam")
INDICES = [0, 1, 2, 3]


def _hooked_outputs(model, x, blocks):
    """Each block's raw output (token state included) in one forward."""
    seen = {}
    handles = [
        block.register_forward_hook(lambda module, args, out, i=i: seen.__setitem__(i, out))
        for i, block in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[i] for i in range(len(blocks))]


@pytest.mark.parametrize("method", METHODS)
def test_restored_patches_are_the_features_of_the_tokens_that_stand_for_them(method):
    model = small_vit()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method=method, dense=True)
    x = images(2, 64)
    last = _hooked_outputs(fast, x, fast.blocks)[3]
    tokens, _, _ = evit_patch.split_state(last, fast)
    # Reference: the membership track_tokens composes from each reorganizer's published Mix.
    members = track_tokens(fast, x).stages[-1].members  # (B, T', 16) bool
    owner = members.to(torch.uint8).argmax(dim=1)  # every patch is in exactly one token
    assert torch.equal(members.sum(dim=1), torch.ones(2, 16, dtype=members.sum(dim=1).dtype))
    expected = torch.cat([tokens[:, :1], torch.stack([tokens[b, 1:][owner[b]] for b in range(2)])], dim=1)
    restored = evit_patch.restore(last, fast)
    assert restored.shape == (2, 17, 64)
    torch.testing.assert_close(restored, expected, rtol=0, atol=0)
    # dense changes nothing the model computes
    plain = evit_patch.apply(model, layers=[1, 2], keep=0.5, method=method)
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", list_reductions())
def test_the_destination_of_every_entering_token_is_the_token_it_went_into(method):
    model = small_vit()
    fast = evit_patch.apply(model, layers=[1], keep=0.5, method=method, dense=True)
    seen = []
    reorganizer = fast.blocks[1].evit
    handle = reorganizer.published.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        fast(images(2, 64))
    handle.remove()
    weights, members = mixing(seen[0], 16)
    dest = destination(seen[0], 16)
    assert torch.equal(dest, members.to(torch.uint8).argmax(dim=1))
    assert torch.equal(members.any(dim=1), dest >= 0)


def test_keep_one_restores_the_originals_outputs_exactly_through_timm():
    model = small_vit()
    fast = evit_patch.apply(model, layers=[1, 2], keep=1.0, dense=True)
    x = images(2, 64)
    for kwargs in (
        dict(norm=True, output_fmt="NCHW", intermediates_only=True),
        dict(norm=False, output_fmt="NLC", return_prefix_tokens=True),
        dict(norm=True, output_fmt="NCHW", output_dict=True, return_prefix_tokens=True),
    ):
        with torch.no_grad():
            got, want = (
                fast.forward_intermediates(x, INDICES, **kwargs),
                model.forward_intermediates(x, INDICES, **kwargs),
            )
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        got = fast.get_intermediate_layers(x, n=2, reshape=True, norm=True)
        want = model.get_intermediate_layers(x, n=2, reshape=True, norm=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_timm_intermediates_of_a_reduced_model_are_full_grids_of_the_restored_blocks(method):
    model = small_gap("cls_avg")  # an average-pooled head: its final norm weighs tokens, the intermediates must not
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method=method, dense=True)
    x = images(2, 64)
    with torch.no_grad():
        final, grids = fast.forward_intermediates(x, INDICES, norm=True, return_prefix_tokens=True)
        originals = model.forward_intermediates(x, INDICES, norm=True, intermediates_only=True)
    raw = _hooked_outputs(fast, x, fast.blocks)
    for (grid, prefix), original, hidden in zip(grids, originals, raw):
        assert grid.shape == original.shape == (2, 64, 4, 4)
        restored = model.norm(evit_patch.restore(hidden, fast))  # the unpatched norm: an explicit reference
        torch.testing.assert_close(prefix, restored[:, :1], rtol=0, atol=1e-12)
        torch.testing.assert_close(grid, restored[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4), rtol=0, atol=1e-12)
    torch.testing.assert_close(grids[0][0], originals[0], rtol=0, atol=0)  # before the first reorganization
    assert final.shape[-1] == 64 and final.shape[1] < 17  # the final features are the reduced tokens


def test_restored_intermediates_carry_gradients_to_every_block():
    model = small_vit()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method="merge", dense=True)
    grids = fast.forward_intermediates(images(2, 64), [3], intermediates_only=True)
    grids[0].square().sum().backward()
    assert all(b.mlp.fc1.weight.grad.abs().sum() > 0 for b in fast.blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("num_image", [1, 7, 196])
def test_owners_round_trip_exactly_in_every_carrier_dtype(dtype, num_image):
    torch.manual_seed(0)
    patches = 196 if num_image > 1 else 5
    owner = torch.randint(-1, num_image, (2, patches))
    positions, sizes = torch.randint(0, patches, (2, num_image)), torch.randint(1, 300, (2, num_image)).float()
    packed = token_state.pack(torch.zeros(2, 1 + num_image, 8, dtype=dtype), positions, sizes, 1, owner)
    width = token_state.owner_width(patches, num_image)
    carried = 2 + width if dtype in (torch.float32, torch.float64) else 4 + 2 * width
    assert packed.shape == (2, 1 + num_image, 8 + carried)
    _, got_positions, got_sizes, got_owner = token_state.unpack_owner(packed, 8, 1, patches)
    assert torch.equal(got_owner, owner) and torch.equal(got_positions, positions)
    assert torch.equal(got_sizes, sizes.to(got_sizes.dtype))


def test_bfloat16_models_restore_the_same_grid_as_float32():
    model = small_vit(torch.float32)
    x = images(2, 64, dtype=torch.float32)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method="merge", dense=True)
    half = copy.deepcopy(fast).to(torch.bfloat16)
    with torch.no_grad():
        full = fast.forward_intermediates(x, [3], intermediates_only=True, output_fmt="NLC")[0]
        low = half.forward_intermediates(x.bfloat16(), [3], intermediates_only=True, output_fmt="NLC")[0]
    assert low.shape == full.shape == (2, 16, 64)
    # the same token feature lands on each patch: the patches sharing a token share a feature in both
    same_full = torch.cdist(full.float(), full.float()) < 1e-6
    same_low = torch.cdist(low.float(), low.float()) < 1e-6
    assert (same_full == same_low).float().mean() > 0.95


def test_hf_dinov2_backbone_is_served_with_full_feature_maps():
    backbone = small_hf_dinov2("backbone", out_features=["stage1", "stage2", "stage4"])
    x = dinov2_images(2)
    with torch.no_grad():
        original = backbone(x, output_hidden_states=True)
        same = evit_patch.apply(backbone, layers=[1, 2], keep=1.0)(x, output_hidden_states=True)
        fast = evit_patch.apply(backbone, layers=[1, 2], keep=0.5, method="merge")
        reduced = fast(x, output_hidden_states=True)
        maps_only = fast(x)
    torch.testing.assert_close(same.feature_maps, original.feature_maps, rtol=0, atol=0)
    torch.testing.assert_close(same.hidden_states, original.hidden_states, rtol=0, atol=0)
    assert evit_patch.get_config(fast).dense  # a backbone's default
    assert [m.shape for m in reduced.feature_maps] == [m.shape for m in original.feature_maps] == [(2, 32, 6, 6)] * 3
    assert [h.shape for h in reduced.hidden_states] == [h.shape for h in original.hidden_states]
    assert maps_only.hidden_states is None
    torch.testing.assert_close(reduced.feature_maps, maps_only.feature_maps, rtol=0, atol=0)
    # stage4 = layernorm(restored output of layer 3), by the explicit reference
    raw = _hooked_outputs(fast, x, fast.encoder.layer)[3]
    expected = backbone.layernorm(evit_patch.restore(raw, fast))[:, 1:].reshape(2, 6, 6, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(reduced.feature_maps[2], expected, rtol=0, atol=1e-12)
    with pytest.raises(InvalidPlanError, match=r"^Dinov2Backbone returns feature maps .* only with dense=True"):
        evit_patch.apply(backbone, layers=[1, 2], keep=0.5, dense=False)


def test_hf_dinov2_model_serves_restored_hidden_states_only_when_dense():
    model, x = small_hf_dinov2("plain"), dinov2_images(2)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, dense=True)
    with torch.no_grad():
        out, original = fast(x, output_hidden_states=True), model(x, output_hidden_states=True)
        plain = fast(x)
    assert [h.shape for h in out.hidden_states] == [h.shape for h in original.hidden_states]
    torch.testing.assert_close(out.hidden_states[:2], original.hidden_states[:2], rtol=0, atol=0)
    torch.testing.assert_close(out.pooler_output, plain.pooler_output, rtol=0, atol=0)
    assert out.last_hidden_state.shape[1] < original.last_hidden_state.shape[1]  # the head's reduced tokens
    sparse = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    with pytest.raises(UnsupportedInputError, match=r"output_hidden_states cannot be honoured .*dense=True\) serves"):
        sparse(x, output_hidden_states=True)


def test_what_dense_cannot_serve_is_refused_by_name():
    model = small_vit()
    with pytest.raises(InvalidPlanError, match=r"dense=True .* with fuse=False the dropped patches have none"):
        evit_patch.apply(model, layers=[1], keep=0.5, fuse=False, dense=True)
    with pytest.raises(InvalidPlanError, match=r"dense=True restores every patch .* cls_only=True leaves out"):
        evit_patch.apply(model, layers=[1], keep=0.5, cls_only=True, dense=True)
    sparse = evit_patch.apply(model, layers=[1, 2], keep=0.5, method="merge")
    hidden = _hooked_outputs(sparse, images(1, 64), sparse.blocks)[3]
    with pytest.raises(UnsupportedInputError, match=r"^restore: .* carry no record .* dense=True"):
        evit_patch.restore(hidden, sparse)
    with pytest.raises(UnsupportedInputError, match=r"blocks \[2, 3\] hold fewer tokens.*dense=True"):
        sparse.forward_intermediates(images(1, 64), [2, 3])
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, dense=True)
    with pytest.raises(UnsupportedInputError, match=r"attention mask built for every token"):
        fast.forward_intermediates(images(1, 64), [3], attn_mask=torch.ones(17, 17, dtype=torch.bool))
    with pytest.raises(UnsupportedInputError, match=r"^restore: .* is not an evit_patch model"):
        evit_patch.restore(hidden, model)


def test_a_dense_model_pickles_copies_and_reloads_with_its_intermediates(tmp_path):
    model = small_vit()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method="dam", dense=True)
    x = images(2, 64)
    with torch.no_grad():
        want = fast.forward_intermediates(x, [2, 3], intermediates_only=True)
        for other in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
            assert other.forward_intermediates.model is other
            torch.testing.assert_close(other.forward_intermediates(x, [2, 3], intermediates_only=True), want)
    assert evit_patch.get_config(fast).to_dict()["dense"] is True
    assert "dense: every block's output restores to the full patch grid" in str(evit_patch.explain(fast))
    evit_patch.save_pretrained(fast, tmp_path / "saved", model_kwargs=dict(depth=4, embed_dim=64, num_heads=4))
    loaded = evit_patch.load_pretrained(tmp_path / "saved").double()
    assert evit_patch.get_config(loaded).dense
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_intermediates(x, [2, 3], intermediates_only=True), want)


def test_dense_intermediates_export_and_compile():
    model = small_vit(torch.float32)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method="merge", dense=True)

    class Intermediates(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.forward_intermediates(x, [1, 3], norm=True, intermediates_only=True)

    wrapper = Intermediates(fast).eval()
    x = images(2, 64, dtype=torch.float32)
    with torch.no_grad():
        want = wrapper(x)
        exported = torch.export.export(wrapper, (x,)).module()
        torch.testing.assert_close(exported(x), want, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(wrapper, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)


def test_a_dense_plan_may_stop_reducing_before_the_last_blocks():
    every = evit_patch.EViTConfig.build(range(12), 1.0, num_blocks=12)
    assert stops(12, every) == (12,)
    assert stops(12, every.replace(cls_only=True)) == (11,)
    assert stops(12, every.replace(dense=True)) == (6, 9, 12)


def test_a_dense_objective_is_the_restored_last_blocks_per_patch_cosine():
    model = small_vit()
    x = images(3, 64)
    every = evit_patch.EViTConfig.build(range(4), 1.0, evit_patch.PlanOptions(method="merge", dense=True), num_blocks=4)
    objective = Objective(model, x, 8, every)
    distance, _ = objective((1, 2), (0.5, 0.5))
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method="merge", dense=True)
    restored = evit_patch.restore(_hooked_outputs(fast, x, fast.blocks)[3], fast)
    original = _hooked_outputs(model, x, model.blocks)[3]
    expected = 1 - torch.nn.functional.cosine_similarity(restored, original, dim=-1).mean()
    assert distance == pytest.approx(expected.item(), abs=1e-6)


def test_a_backbone_takes_a_budget_and_its_searched_schedule():
    backbone = small_hf_dinov2("backbone", out_features=["stage4"])
    fast = evit_patch.apply(backbone, flops=0.7, method="dam", progress=False)
    explained = evit_patch.explain(fast)
    assert evit_patch.get_config(fast).dense
    assert explained.macs_patched <= 0.7 * explained.macs_original * 1.001
    with torch.no_grad():
        assert [m.shape for m in fast(dinov2_images(2)).feature_maps] == [(2, 32, 6, 6)]


@pytest.mark.parametrize(
    "make",
    [lambda: small_beit(), lambda: small_eva(), lambda: small_relpos(), lambda: small_map()],
    ids=["beit", "eva", "relpos", "map"],
)
def test_every_timm_family_serves_restored_intermediates(make):
    model = make()
    x = images(2, model.patch_embed.img_size[0])
    same = evit_patch.apply(model, layers=[1, 2], keep=1.0, dense=True)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method="merge", dense=True)
    with torch.no_grad():
        want = model.forward_intermediates(x, INDICES, norm=True, intermediates_only=True)
        torch.testing.assert_close(same.forward_intermediates(x, INDICES, norm=True, intermediates_only=True), want)
        got = fast.forward_intermediates(x, INDICES, norm=True, intermediates_only=True)
    assert [g.shape for g in got] == [w.shape for w in want]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # before the first reorganization


def test_open_clip_intermediates_are_restored_when_dense_and_refused_after_a_reorganization_otherwise():
    model, x = small_open_clip(), open_clip_images(2)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=INDICES, normalize_intermediates=True)
        same = evit_patch.apply(model, layers=[1, 2], keep=1.0, dense=True)
        got = same.forward_intermediates(x, indices=INDICES, normalize_intermediates=True)
        torch.testing.assert_close(got["image_intermediates"], want["image_intermediates"], rtol=0, atol=1e-12)
        fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, dense=True)
        reduced = fast.forward_intermediates(x, indices=INDICES, output_extra_tokens=True)
        assert [g.shape for g in reduced["image_intermediates"]] == [(2, 32, 4, 4)] * 4
        assert [p.shape for p in reduced["image_intermediates_prefix"]] == [(2, 1, 32)] * 4
        torch.testing.assert_close(reduced["image_features"], fast(x), rtol=0, atol=0)
    # Without dense=True, open_clip's own reshape would return wrong-shaped grids silently: refused.
    sparse = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    with pytest.raises(
        UnsupportedInputError, match=r"^forward_intermediates: VisionTransformer reorganizes .* \[2, 3\]"
    ):
        sparse.forward_intermediates(x, indices=2)
    assert sparse.forward_intermediates(x, indices=[0])["image_intermediates"][0].shape == (2, 32, 4, 4)
