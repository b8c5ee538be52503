"""What ``apply`` promises besides the numbers: exact no-op, isolation, attributes, modes, keep changes."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import images, make_vit
from timm.models.vision_transformer import VisionTransformer

import evit_patch
from evit_patch.graph.reorganizer import TokenReorganizer
from evit_patch.reductions.base import Permutation


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_keep_one_is_bitwise_identical(name):
    model = make_vit(name, dtype=torch.float32)
    x = images(3, dtype=torch.float32)
    fast = evit_patch.apply(model, layers=[0, 5, 11], keep=1.0)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_keep_that_rounds_to_all_tokens_is_identity():
    """ceil(0.999 * 196) = 196: nothing is dropped, so no fused token is added either."""
    model = make_vit()
    fast = evit_patch.apply(model, layers=[3], keep=0.999)
    x = images(1)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
    assert evit_patch.explain(fast).rows[3].tokens_out == 197


def test_patched_model_is_a_copy_of_the_same_class_with_the_same_keys():
    model = timm.create_model("deit_tiny_patch16_224").eval()
    before = _state(model)
    fast = evit_patch.apply(model, layers=[3, 6, 9], keep=0.7)
    assert fast is not model and isinstance(fast, VisionTransformer)
    assert list(fast.state_dict()) == list(model.state_dict())
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(fast.parameters(), model.parameters()))
    for attr in ("pretrained_cfg", "default_cfg", "num_classes", "num_prefix_tokens", "global_pool", "embed_dim"):
        assert getattr(fast, attr) == getattr(model, attr), attr
    assert fast.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 72, 192)
    assert type(model.blocks[3]).__name__ == "Block" and not any(
        isinstance(m, TokenReorganizer) for m in model.modules()
    )
    # Loading the original weights into the patched model (and back) works key for key.
    fast.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(fast.state_dict(), strict=True)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)


def test_original_unchanged_after_training_the_patched_model():
    model = make_vit(dtype=torch.float32)
    before = _state(model)
    fast = evit_patch.apply(model, layers=[3, 6, 9], keep=0.7).train()
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    fast(images(2, dtype=torch.float32)).logsumexp(-1).sum().backward()
    opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(fast.state_dict()["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])


def test_train_eval_follow_the_patched_model():
    model = make_vit(drop_rate=0.5, drop_path_rate=0.5, dtype=torch.float32)
    fast = evit_patch.apply(model, layers=[3, 6, 9], keep=0.7)
    assert not fast.training and not fast.blocks[3].training
    x = images(2, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(fast(x), fast(x))  # eval: dropout and drop-path off
        fast.train()
        assert fast.blocks[3].training and fast.blocks[3].drop_path1.training
        assert not torch.equal(fast(x), fast(x))  # train: drop-path and dropout active
        fast.eval()
        assert torch.equal(fast(x), fast(x))


def test_fused_token_receives_gradient_into_scores():
    """d loss / d q exists only through the scores of the fused token's weights."""
    q = torch.randn(1, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 7, 4, dtype=torch.float64)
    x = torch.randn(1, 7, 3, dtype=torch.float64, requires_grad=True)
    scores = evit_patch.cls_attention_from_qk(q, k, num_prefix=1)
    out = evit_patch.reorganize(x, scores, num_prefix=1, num_keep=3).tokens
    assert out.shape == (1, 1 + 3 + 1, 3)
    out[:, -1].sum().backward()
    assert q.grad.abs().sum() > 0 and x.grad[0, 1:].abs().sum() > 0


def test_set_keep_changes_tokens_without_retracing_and_validates():
    model = make_vit()
    fast = evit_patch.apply(model, layers=[3, 6, 9], keep=0.7)
    code = [fast.blocks[i].code for i in (3, 6, 9)]
    evit_patch.set_keep(fast, [0.5, 1.0, 0.5])
    assert [fast.blocks[i].code for i in (3, 6, 9)] == code
    assert [r.tokens_out for r in evit_patch.explain(fast).rows if r.keep] == [1 + 98 + 1, 100, 1 + 50 + 1]
    with torch.no_grad():
        assert fast.forward_features(images(1)).shape[1] == 52
    with pytest.raises(evit_patch.InvalidPlanError, match=r"got 2 keep rates for 3 reorganizing layers \[3, 6, 9\]"):
        evit_patch.set_keep(fast, [0.5, 0.5])
    with pytest.raises(evit_patch.InvalidPlanError, match=r"set_keep, layer 3: keep must be a number in \(0, 1\]"):
        evit_patch.set_keep(fast, 0.0)
    with pytest.raises(evit_patch.InvalidPlanError, match="is not an evit_patch model; call evit_patch.apply first"):
        evit_patch.set_keep(model, 0.5)


def test_any_image_size_with_dynamic_img_size():
    model = make_vit(dynamic_img_size=True)
    fast = evit_patch.apply(model, layers=[3, 6, 9], keep=0.7)
    for size in (224, 160, 288):
        with torch.no_grad():
            tokens = fast.forward_features(images(1, size)).shape[1]
        assert tokens == evit_patch.explain(fast, img_size=size).rows[-1].tokens_out


def test_list_supported_names_families():
    entries = {e.family: e for e in evit_patch.list_supported()}
    assert entries["timm.VisionTransformer"].supported
    assert not entries["timm.SwinTransformer"].supported
    assert sorted(e.family for e in evit_patch.list_supported("timm.Vision*", include_refused=False)) == [
        "timm.VisionTransformer",
        "timm.VisionTransformerRelPos",
    ]
    assert {e.family for e in evit_patch.list_supported("timm.*", include_refused=False)} == {
        "timm.Beit",
        "timm.Eva",
        "timm.VisionTransformerRelPos",
        "timm.VisionTransformer",
    }


def test_forced_reorganization_at_keep_one_only_permutes_tokens():
    """Benchmarks force the reorganization on at keep 1.0: tokens are re-ordered by score, none
    dropped, no fused token, and the class-token output is unchanged (attention is permutation
    equivariant once position embeddings are added)."""
    model = make_vit()
    fast = evit_patch.apply(model, layers=[3, 6, 9], keep=1.0)
    for module in evit_patch.reorganizers(fast):
        module.reduction = Permutation()
    x = images(2)
    with torch.no_grad():
        features, reference = fast.forward_features(x), model.forward_features(x)
        assert features.shape == reference.shape
        assert not torch.allclose(features[:, 1:], reference[:, 1:])
        torch.testing.assert_close(features[:, 0], reference[:, 0], rtol=0, atol=1e-10)
        torch.testing.assert_close(features[:, 1:].sum(1), reference[:, 1:].sum(1), rtol=0, atol=1e-9)
