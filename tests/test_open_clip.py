"""open_clip's ``VisionTransformer`` (the ``.visual`` tower of its ViT CLIP models): nn.MultiheadAttention
re-expressed with SDPA, class-token, average and attentional pooling (CoCa), against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from cases import OPEN_CLIP_POOLER, OPEN_CLIP_TOWER, open_clip_images, small_open_clip, small_open_clip_pooled
from conftest import images
from reference import reference_forward, reference_forward_open_clip
from tracked import NoSizeBias, check_macs, check_matches_reference, check_onnx

import evit_patch

open_clip = pytest.importorskip("open_clip", reason='needs the open_clip extra: pip install "evit_patch[open_clip]"')


@pytest.mark.parametrize("method", ["evit", "merge"])
def test_class_token_pool_matches_reference(method):
    """pool_type='tok' (the family table runs 'avg' and the attentional pooler)."""
    check_matches_reference("open_clip", small_open_clip("tok"), open_clip_images(), [1, 2], [0.6, 0.5], method=method)


@pytest.mark.parametrize("method", ["evit", "merge"])
def test_norm_after_a_class_token_pool_matches_reference(method):
    """``final_ln_after_pool``: ``ln_post`` reads the pooled class token only, so the last block drops the
    token state (merging carries it until then)."""
    model = small_open_clip("tok", final_ln_after_pool=True)
    check_matches_reference("open_clip", model, open_clip_images(), [1, 2], [0.6, 0.5], method=method)
    assert evit_patch.apply(model, layers=[1, 2], keep=0.5, method=method).ln_post.__class__ is type(model.ln_post)


def test_without_fusion_matches_reference():
    check_matches_reference("open_clip", small_open_clip("avg"), open_clip_images(), [1, 2], 0.5, fuse=False)


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_keep_one_matches_original_to_float64_rounding(pool):
    """Not bitwise: nn.MultiheadAttention's fused kernel and SDPA round differently (the family table
    checks float32 to 1e-6)."""
    model, x = small_open_clip(pool), open_clip_images(2)
    fast = evit_patch.apply(model, layers=[0, 1, 2, 3], keep=1.0)
    with torch.no_grad():
        want = model(x)
        assert (fast(x) - want).abs().max() <= 1e-12 * want.abs().max()


def test_class_token_pool_explain_equals_counted_macs():
    check_macs(small_open_clip("tok"), open_clip_images(1))


def test_vit_b_32_cost():
    """The ViT-B-32 tower at keep 0.7 @ 3, 6, 9: 49 image tokens -> 35 -> 26 -> 19 kept (+ [CLS] and the
    fused token); 4.41 GMACs unpatched, open_clip's own published figure for this tower."""
    torch.manual_seed(0)
    tower = open_clip.create_model("ViT-B-32", pretrained=None).visual
    report = evit_patch.explain(evit_patch.apply(tower, layers=[3, 6, 9], keep=0.7))
    assert [r.tokens_out for r in report.rows] == [50] * 3 + [37] * 3 + [28] * 3 + [21] * 3
    assert (round(report.macs_original / 1e9, 3), round(report.macs_patched / 1e9, 3)) == (4.409, 3.099)


def test_original_keeps_its_multihead_attention():
    """The patched copy re-expresses nn.MultiheadAttention on parameters of its own, under the same keys."""
    model = small_open_clip()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.7, method="merge")
    assert isinstance(model.transformer.resblocks[1].attn, torch.nn.MultiheadAttention)
    assert list(fast.state_dict()) == list(model.state_dict())
    assert "transformer.resblocks.1.attn.in_proj_weight" in fast.state_dict()
    assert fast.transformer.resblocks[1].attn.in_proj_weight is not model.transformer.resblocks[1].attn.in_proj_weight


def test_onnx_matches_eager(tmp_path):
    check_onnx(small_open_clip("avg", layers=3), open_clip_images(), tmp_path)


def test_attention_mask_is_refused_at_call_time():
    fast = evit_patch.apply(small_open_clip(), layers=[1], keep=0.5)
    message = r"resblocks\.1 was patched by evit_patch with attn_mask=None"
    with pytest.raises(evit_patch.UnsupportedInputError, match=message):
        fast.transformer.resblocks[1](torch.zeros(1, 17, 32, dtype=torch.float64), attn_mask=torch.zeros(17, 17))


def _clip(dtype=torch.float64):
    """A tiny CLIP: the test tower and a 2-layer text transformer."""
    torch.manual_seed(0)
    vision = dict(OPEN_CLIP_TOWER, ls_init_value=0.5)
    vision.pop("output_dim")
    vision.pop("heads")
    text = dict(context_length=8, vocab_size=100, width=32, heads=2, layers=2)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(vision, head_width=16), text_cfg=text)
    return model.to(dtype).eval()


def test_zero_shot_with_a_patched_tower():
    """The users' workflow: ``model.visual = apply(model.visual)``; ``encode_image`` and the zero-shot
    logits are the reference tower's embeddings against the text tower's."""
    model = _clip()
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"it holds VisionTransformer at 'visual'"):
        evit_patch.apply(model, layers=[1], keep=0.5)
    original = model.visual
    model.visual = evit_patch.apply(model.visual, layers=[1, 2], keep=0.5)
    text = torch.randint(0, 100, (5, 8))
    x = open_clip_images()
    with torch.no_grad():
        image_emb = model.encode_image(x, normalize=True)
        text_emb = model.encode_text(text, normalize=True)
        want = torch.nn.functional.normalize(reference_forward_open_clip(original, x, [1, 2], 0.5), dim=-1)
        torch.testing.assert_close(image_emb, want, rtol=0, atol=1e-9)
        logits = image_emb @ text_emb.T
        torch.testing.assert_close(logits, want @ text_emb.T, rtol=0, atol=1e-9)
        assert not torch.allclose(want, torch.nn.functional.normalize(original(x), dim=-1), atol=1e-3)


def test_attentional_pool_matches_reference():
    """The pooler's probe weighs a merged token by its size; ``ln_post``, the pool over its queries
    (``'none'``: all of them) and ``proj`` follow as open_clip runs them."""
    check_matches_reference(
        "open_clip", small_open_clip_pooled("none"), open_clip_images(), [1, 2], [0.6, 0.5], method="merge"
    )


def test_attentional_pool_with_output_tokens_weighs_tokens_by_size():
    """CoCa's tower: ``output_tokens`` returns the pooler's other queries (a fixed count) beside the pooled
    one, both as the reference computes them; without the size bias the pooler counts the fused token
    once, and both move away from it."""
    model, x = small_open_clip_pooled(output_tokens=True), open_clip_images()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    with torch.no_grad():
        got, want = fast(x), reference_forward_open_clip(model, x, [1, 2], 0.5)
        assert [tuple(t.shape) for t in got] == [(3, 16), (3, 3, 16)]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
        fast.attn_pool.evit_bias = NoSizeBias()
        assert all((a - b).abs().max() > 1e-3 for a, b in zip(fast(x), want))


def test_attentional_pool_keep_one_matches_original_to_float_rounding():
    """Not bitwise, as for the other pools: the blocks' nn.MultiheadAttention is re-expressed with SDPA;
    the pooler itself runs open_clip's own call, with no mask while no token has moved."""
    model, x = small_open_clip_pooled(), open_clip_images(2)
    fast = evit_patch.apply(model, layers=[0, 1, 2, 3], keep=1.0)
    masks = []
    fast.attn_pool.evit_bias.register_forward_hook(lambda module, args, output: masks.append(output))
    with torch.no_grad():
        want = model(x)
        assert (fast(x) - want).abs().max() <= 1e-12 * want.abs().max()
    assert masks == [None]


def test_attentional_pool_explain_equals_counted_macs():
    """``pool_type='none'``: ``proj`` maps every query."""
    check_macs(small_open_clip_pooled("none"), open_clip_images(1), method="merge")


def test_timm_tower_is_patched_at_its_trunk():
    """open_clip's timm-based towers (SigLIP, ...) hold a timm ViT at ``.trunk``: patch that."""
    torch.manual_seed(0)
    tower = open_clip.timm_model.TimmModel("test_vit", embed_dim=16, pool="token")  # timm's 6-block test ViT
    tower.set_input_size(64)
    tower = tower.double().eval()
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"it holds VisionTransformer .* at 'trunk'"):
        evit_patch.apply(tower, layers=[1], keep=0.5)
    trunk = tower.trunk
    tower.trunk = evit_patch.apply(trunk, layers=[1, 3, 4], keep=0.7)
    x = images(2, size=64)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), tower.head(reference_forward(trunk, x, [1, 3, 4], 0.7)), rtol=0, atol=1e-9)


REFUSALS = {
    "two_poolers": (
        dict(OPEN_CLIP_POOLER, attentional_pool="parallel", output_dim=32),
        r"VisionTransformer has attentional_pool='parallel': ln_post normalises every token before two "
        r"attentional poolers \(open_clip's untested two-pooler variant\); expected attentional_pool=True",
    ),
    "pool_none": (
        dict(pool_type="none"),
        r"VisionTransformer has pool_type='none': its output is every token, which EViT drops and fuses; "
        r"expected pool_type='tok' or 'avg'",
    ),
    "final_ln_after_pool": (
        dict(pool_type="avg", final_ln_after_pool=True),
        r"VisionTransformer has final_ln_after_pool=True and pool_type='avg' \(CLIPA\): it averages the last "
        r"block's output directly, with no per-token norm in between where the fused tokens' sizes could weigh "
        r"the mean; expected final_ln_after_pool=False or pool_type='tok'",
    ),
    "output_tokens": (
        dict(output_tokens=True),
        r"VisionTransformer has output_tokens=True: it returns every image token, which EViT drops and "
        r"fuses; expected output_tokens=False",
    ),
    "patch_dropout": (
        dict(patch_dropout=0.5),
        r"VisionTransformer drops patches at random in training \(patch_dropout > 0\); expected none",
    ),
    "custom_block": (
        dict(qk_norm=True),
        r"VisionTransformer\.transformer\.resblocks\.0: expected a self-attention ResidualAttentionBlock, "
        r"found CustomResidualAttentionBlock",
    ),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_name_the_configuration(name):
    kwargs, message = REFUSALS[name]
    model = small_open_clip("tok" if "pool_type" not in kwargs else kwargs.pop("pool_type"), **kwargs)
    with pytest.raises(evit_patch.UnsupportedModelError, match=f"^{message}"):
        evit_patch.apply(model, layers=[1], keep=0.5)


def test_sequence_first_attention_is_refused_by_block():
    model = small_open_clip()
    model.transformer.resblocks[2].attn = torch.nn.MultiheadAttention(32, 2, batch_first=False)
    message = r"transformer\.resblocks\.2\.attn: expected a batch-first"
    with pytest.raises(evit_patch.UnsupportedModelError, match=message):
        evit_patch.apply(model, layers=[1], keep=0.7)


def test_other_image_size_is_refused():
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"only accepts 32x32 images .* img_size=64"):
        evit_patch.apply(small_open_clip(), layers=[1], keep=0.7, img_size=64)


def test_pooling_attributes_set_after_patching_are_refused_at_call_time():
    """``output_tokens = True`` after patching would return the surviving tokens as if they were the grid's."""
    model, x = small_open_clip("avg"), open_clip_images(1)
    fast = evit_patch.apply(model, layers=[1], keep=0.5, method="merge")
    with torch.no_grad():
        want = fast(x)
        fast.output_tokens = True
        message = (
            r"^VisionTransformer was patched by evit_patch with pool_type='avg', final_ln_after_pool=False, "
            r"output_tokens=False: output_tokens=True cannot be honoured \(the patched blocks return fewer"
        )
        with pytest.raises(evit_patch.UnsupportedInputError, match=message):
            fast(x)
        fast.output_tokens, fast.pool_type = False, "tok"
        with pytest.raises(evit_patch.UnsupportedInputError, match=r"output_tokens=False: pool_type='tok' cannot be"):
            fast(x)
        fast.pool_type = "avg"
        torch.testing.assert_close(fast(x), want, rtol=0, atol=0)
        model.output_tokens = True  # the original is untouched by the guard: it returns every token
        assert model(x)[1].shape == (1, 16, 32)


def test_attentional_pooler_serves_output_tokens_after_patching():
    """CoCa's tower returns its pooler's query outputs, a fixed number whatever the blocks keep."""
    model, x = small_open_clip("tok", attentional_pool=True, attn_pooler_queries=4), open_clip_images(1)
    fast = evit_patch.apply(model, layers=[1], keep=0.5)
    fast.output_tokens = model.output_tokens = True
    with torch.no_grad():
        pooled, tokens = fast(x)
    assert tokens.shape == model(x)[1].shape
