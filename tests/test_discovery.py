"""Models no family claims patch by structural discovery, with no family code (issue 22).

Every model here is random-init, float64. References: a timm ``VisionTransformer`` holding the same
weights and patched by the timm family (itself held to ``reference.py``), or, for vit-pytorch, an
explicit EViT forward written from its parameters. At keep 1.0 the patched model is the original
bitwise (up to rounding where ``nn.MultiheadAttention`` is re-expressed with SDPA); at keep 0.7
every block receives the token count ``explain`` states.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import _reorganize_sample
from vit_pytorch import SimpleViT, ViT
from vit_zoo import ATTENTION_FORMS, DinoDropPath, DinoStyleViT, HandViT, dino_as_timm, mae, mae_as_timm, to_timm

import evit_patch
from evit_patch import Pool, UnsupportedInputError
from evit_patch.families import find_family

LAYERS = [0, 1]
# 16 image tokens + [CLS] in; EViT keeps ceil(0.7 * 16) = 12 + fused, then ceil(0.7 * 13) = 10 + fused;
# merging keeps 12, then ceil(0.7 * 12) = 9 (no fused token).
COUNTS = {"evit": [17, 14, 12], "merge": [17, 13, 10]}


def _images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _seeded(make):
    torch.manual_seed(0)
    return make().double().eval()


def _observed(fast, x) -> tuple[list[int], torch.Tensor]:
    """Tokens each block receives (forward pre-hooks) and the output."""
    seen = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for _, b in find_family(fast).blocks(fast)
    ]
    with torch.no_grad():
        out = fast(x)
    for hook in hooks:
        hook.remove()
    return seen, out


def _check(model, method: str, counts: list[int], *, exact: bool = True) -> tuple[torch.nn.Module, torch.Tensor]:
    """Patch at keep 0.7: counts observed == explain == ``counts``; then keep 1.0: the original."""
    x = _images()
    fast = evit_patch.apply(model, layers=LAYERS, keep=0.7, method=method)
    explanation = evit_patch.explain(fast)
    assert explanation.family == "discovered" and explanation.discovered
    seen, out = _observed(fast, x)
    assert seen == [row.tokens_in for row in explanation.rows] == counts
    evit_patch.set_keep(fast, 1.0)
    with torch.no_grad():
        same, original = fast(x), model(x)
    if exact:
        assert torch.equal(same, original)
    else:
        torch.testing.assert_close(same, original, rtol=0, atol=1e-12)
    evit_patch.set_keep(fast, 0.7)
    return fast, out


@pytest.mark.parametrize("form", [*ATTENTION_FORMS, "post_norm"])
def test_hand_written_vits_patch_in_every_attention_form(form):
    model = _seeded(lambda: HandViT(form))
    family = find_family(model)
    assert family.name == "discovered"
    assert [name for name, _ in family.blocks(model)] == ["blocks.0", "blocks.1", "blocks.2"]
    exact = not form.startswith("mha")  # nn.MultiheadAttention is re-expressed with SDPA
    for method in ("evit", "merge"):
        _, out = _check(model, method, COUNTS[method], exact=exact)
        if form == "post_norm":
            assert method != "evit" or torch.allclose(out, _post_norm_reference(model, _images()), rtol=0, atol=1e-9)
            continue
        if method == "evit" or form in ("matmul", "mha"):
            reference = evit_patch.apply(to_timm(model), layers=LAYERS, keep=0.7, method=method)
            with torch.no_grad():
                torch.testing.assert_close(out, reference(_images()), rtol=0, atol=1e-9)


def _post_norm_reference(model: HandViT, images: torch.Tensor) -> torch.Tensor:
    """EViT on a post-norm ViT by hand: reorganize right after the attention residual add, before its norm."""
    outputs = []
    for image in images:
        x = model.patch_embed(image[None]).flatten(2).transpose(1, 2)
        x = torch.cat([model.cls_token, x], dim=1) + model.pos_embed
        pos, size = list(range(17)), [1] * 17
        for index, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn.qkv(x).reshape(1, x.shape[1], 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
            probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
            x = x + attn.proj((probs @ v).transpose(1, 2).reshape(1, x.shape[1], -1))
            if index in LAYERS:
                x, pos, size = _reorganize_sample(x, probs, pos, size, 1, 0.7, True, True, False)
            x = block.norm1(x)
            x = block.norm2(x + block.mlp(x))
        outputs.append(model.head(x[:, 0]))
    return torch.cat(outputs)


def test_dino_style_vit_patches_like_timm_and_keeps_its_other_entry_points_honest():
    model = _seeded(DinoStyleViT)
    family = find_family(model)
    assert family.name == "discovered" and family.final_norm(model) == "norm"
    assert DinoDropPath in family.leaf_types()  # reads self.training: stays a leaf, follows .train()
    for method in ("evit", "merge"):
        fast, out = _check(model, method, COUNTS[method])
        reference = evit_patch.apply(dino_as_timm(model), layers=LAYERS, keep=0.7, method=method)
        with torch.no_grad():
            torch.testing.assert_close(out, reference(_images()), rtol=0, atol=1e-9)
    with pytest.raises(
        UnsupportedInputError, match=r"DinoStyleViT.blocks.2 was patched by evit_patch with return_attention=False"
    ):
        fast.get_last_selfattention(_images())


@pytest.mark.parametrize("global_pool", [False, True], ids=["class_token", "mean"])
def test_mae_style_vit_pools_are_read_from_behaviour(global_pool):
    """MAE's timm subclass: global_pool=False reads the class token, True the mean of the image tokens
    (fc_norm after it, no final norm). The timm family leaves it to discovery (its forward is MAE's)."""
    model = _seeded(lambda: mae(global_pool))
    family = find_family(model)
    assert family.name == "discovered"
    assert family.pool(model) is (Pool.AVG if global_pool else Pool.TOKEN)
    assert family.final_norm(model) == (None if global_pool else "norm")
    for method in ("evit", "merge"):
        _, out = _check(model, method, COUNTS[method])
        if method == "evit" or global_pool:  # merging's size-weighted mean: the pool that needs the state
            reference = evit_patch.apply(mae_as_timm(model), layers=LAYERS, keep=0.7, method=method)
            with torch.no_grad():
                torch.testing.assert_close(out, reference(_images()), rtol=0, atol=1e-9)


def test_mae_mean_pool_set_to_token_is_still_read_as_a_mean():
    """global_pool='token' on the mean variant still averages (MAE tests truthiness): the readout says so."""
    model = _seeded(lambda: mae(True))
    model.global_pool = "token"
    assert find_family(model).pool(model) is Pool.AVG
    fast = evit_patch.apply(model, layers=LAYERS, keep=0.7)
    with torch.no_grad():
        reference = evit_patch.apply(mae_as_timm(_seeded(lambda: mae(True))), layers=LAYERS, keep=0.7)
        torch.testing.assert_close(fast(_images()), reference(_images()), rtol=0, atol=1e-9)


VIT_PYTORCH = {
    "ViT_cls": lambda: ViT(
        image_size=32, patch_size=8, num_classes=10, dim=32, depth=3, heads=2, mlp_dim=64, dim_head=16
    ),
    "ViT_mean": lambda: ViT(
        image_size=32, patch_size=8, num_classes=10, dim=32, depth=3, heads=2, mlp_dim=64, dim_head=16, pool="mean"
    ),
    "SimpleViT": lambda: SimpleViT(
        image_size=32, patch_size=8, num_classes=10, dim=32, depth=3, heads=2, mlp_dim=64, dim_head=16
    ),
}


@pytest.mark.parametrize("name", list(VIT_PYTORCH))
def test_vit_pytorch_models_patch_with_no_family_code(name):
    """Blocks are [Attention, FeedForward] pairs whose residual adds live in Transformer.forward;
    einops on the projections, an nn.Softmax module. Without a class token the score is the
    attention each token receives, and the average weighs the fused token by its size."""
    model = _seeded(VIT_PYTORCH[name])
    family = find_family(model)
    assert [n for n, _ in family.blocks(model)] == [f"transformer.layers.{i}" for i in range(3)]
    prefix = 1 if name == "ViT_cls" else 0
    counts = {"evit": [c - 1 + prefix for c in COUNTS["evit"]], "merge": [c - 1 + prefix for c in COUNTS["merge"]]}
    for method in ("evit", "merge"):
        fast, out = _check(model, method, counts[method])
        if method == "evit":
            torch.testing.assert_close(out, _vit_pytorch_reference(model, _images(), prefix), rtol=0, atol=1e-9)
    assert list(fast.state_dict()) == list(model.state_dict())


def _vit_pytorch_reference(model, images: torch.Tensor, prefix: int) -> torch.Tensor:
    """EViT on a vit-pytorch ViT/SimpleViT by hand: [CLS] scores with a class token, else received
    attention; the mean pool weighs each token by the patches it stands for."""
    outputs = []
    for image in images:
        x = model.to_patch_embedding(image[None])
        if prefix:
            x = torch.cat([model.cls_token[None], x], dim=1) + model.pos_embedding[None]
        else:
            x = x + model.pos_embedding.to(x)
        pos, size = list(range(x.shape[1])), [1] * x.shape[1]
        for index, (attn, ff) in enumerate(model.transformer.layers):
            tokens = x.shape[1]
            q, k, v = (
                t.reshape(1, tokens, attn.heads, -1).transpose(1, 2) for t in attn.to_qkv(attn.norm(x)).chunk(3, -1)
            )
            probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
            x = attn.to_out((probs @ v).transpose(1, 2).reshape(1, tokens, -1)) + x
            if index in LAYERS:
                x, pos, size = _reorganize_sample(x, probs, pos, size, prefix, 0.7, True, prefix == 1, prefix == 0)
            x = ff(x) + x
        x = model.transformer.norm(x)
        if prefix:
            pooled = x[0, 0]
        else:
            weights = torch.tensor(size, dtype=x.dtype)
            pooled = (x[0] * weights[:, None]).sum(dim=0) / weights.sum()
        head = getattr(model, "mlp_head", None) or model.linear_head
        outputs.append(head(pooled[None]))
    return torch.cat(outputs)


def test_explain_names_the_family_it_used():
    hand = evit_patch.explain(evit_patch.apply(_seeded(HandViT), layers=LAYERS, keep=0.7))
    lines = str(hand).splitlines()
    assert lines[0] == (
        "EViT plan for HandViT (family=discovered, method=evit, fuse=True, score=cls, proportional attention=off)"
    )
    assert lines[1] == (
        "found by structural discovery: 3 blocks 'blocks.0'..'blocks.2'; 17 tokens x 32 channels on 3x32x32 "
        "images, 1 prefix; the output reads the class token, final norm 'norm'"
    )
    timm_model = to_timm(_seeded(HandViT))
    assert evit_patch.explain(evit_patch.apply(timm_model, layers=LAYERS, keep=0.7)).family == "timm.VisionTransformer"


def test_patched_discovered_models_track_tokens_on_the_discovered_grid():
    model = _seeded(HandViT)
    trace = evit_patch.track_tokens(evit_patch.apply(model, layers=LAYERS, keep=0.7), _images()[:1])
    assert trace.grid == (4, 4) and math.prod(trace.grid) == 16
