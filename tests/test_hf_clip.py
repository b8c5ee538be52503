"""Hugging Face transformers CLIP vision towers: exact EViT and merging against the per-sample
float64 reference; ``pooler_output`` (``post_layernorm`` of [CLS]) and ``image_embeds`` are the
embeddings users compare, ``last_hidden_state`` holds the surviving tokens."""

from __future__ import annotations

import pytest
import torch
from cases import clip_config, clip_images, small_hf_clip
from reference import reference_forward_hf_encoder

import evit_patch

transformers = pytest.importorskip("transformers")


def _outputs(out) -> dict[str, torch.Tensor]:
    return {key: value for key, value in out.items() if value is not None}


@pytest.mark.parametrize("method", ["evit", "merge"])
def test_tower_without_projection_matches_reference(method):
    """``pooler_output`` (the family table runs the tower with its projection)."""
    model, x = small_hf_clip("CLIPVisionModel"), clip_images()
    fast = evit_patch.apply(model, layers=[1, 3], keep=[0.6, 0.5], method=method)
    with torch.no_grad():
        got, original = _outputs(fast(x)), _outputs(model(x))
        want = reference_forward_hf_encoder(model, x, [1, 3], [0.6, 0.5], method=method)
    assert (got["pooler_output"] - original["pooler_output"]).abs().max() > 1e-3  # the patch changes it ...
    for key, value in got.items():  # ... exactly as the reference does
        torch.testing.assert_close(value, want[key], rtol=0, atol=1e-9, msg=key)
    # 36 image tokens -> 22 + 1 fused -> 12 + 1 (merging: 22 -> 11); the last layer packs no state
    assert got["last_hidden_state"].shape == (3, 1 + (13 if method == "evit" else 11), 32)


@pytest.mark.parametrize("method", ["evit", "merge"])
def test_eager_attention_matches_reference(method):
    """transformers' eager CLIP attention takes its softmax in float32 (the reference too): agreement
    to float32 rounding, not 1e-9."""
    model, x = small_hf_clip("CLIPVisionModel", "eager"), clip_images()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method=method)
    with torch.no_grad():
        got, want = fast(x).pooler_output, reference_forward_hf_encoder(model, x, [1, 2], 0.5, method=method)
    torch.testing.assert_close(got, want["pooler_output"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "cls_name, implementation, dtype",
    [  # (CLIPVisionModelWithProjection, sdpa, float32): the family table
        ("CLIPVisionModel", "sdpa", torch.float64),
        ("CLIPVisionModel", "eager", torch.float64),
        ("CLIPVisionModelWithProjection", "eager", torch.float32),
    ],
    ids=str,
)
def test_keep_one_is_bitwise_identical(cls_name, implementation, dtype):
    """Bitwise: the traced attention issues the same kernels as transformers' sdpa/eager functions."""
    model, x = small_hf_clip(cls_name, implementation, dtype), clip_images(2, dtype)
    fast = evit_patch.apply(model, layers=[0, 1, 2, 3], keep=1.0, method="merge")
    with torch.no_grad():
        got, want = _outputs(fast(x)), _outputs(model(x))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_outputs_keep_their_transformers_type():
    model, x = small_hf_clip(), clip_images(2)
    fast = evit_patch.apply(model, layers=[1], keep=0.5, method="merge")
    with torch.no_grad():
        out, as_tuple = fast(x), fast(x, return_dict=False)
    assert type(out) is type(model(x)) and type(out).__name__ == "CLIPVisionModelOutput"
    assert list(out) == ["image_embeds", "last_hidden_state"]
    assert all(torch.equal(a, b) for a, b in zip(as_tuple, out.to_tuple(), strict=True))


def test_clip_model_vision_tower_is_patched_in_place_of_the_original():
    """``CLIPModel`` is refused with the way out: patch its ``vision_model``, and
    ``get_image_features`` then returns the patched tower's projected embedding."""
    torch.manual_seed(0)
    text = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(text_config=text, vision_config=clip_config().to_dict(), projection_dim=16)
    model = transformers.CLIPModel(config).double().eval()
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"holds CLIPVisionModel at 'vision_model'; pass"):
        evit_patch.apply(model, layers=[1], keep=0.5)
    tower = evit_patch.apply(model.vision_model, layers=[1, 2], keep=0.5)
    x = clip_images(2)
    with torch.no_grad():
        want = model.visual_projection(
            reference_forward_hf_encoder(model.vision_model, x, [1, 2], 0.5)["pooler_output"]
        )
        model.vision_model = tower
        torch.testing.assert_close(model.get_image_features(x).pooler_output, want, rtol=0, atol=1e-9)


def test_unsupported_configurations_are_refused():
    with pytest.raises(
        evit_patch.UnsupportedModelError,
        match=r"CLIPForImageClassification is not supported .* \(patch model\.vision_model",
    ):
        config = transformers.CLIPConfig(vision_config=clip_config().to_dict())
        evit_patch.apply(transformers.CLIPForImageClassification(config), layers=[1], keep=0.7)
    model, x = small_hf_clip(), clip_images(1)
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"configured 48x48 input only .* img_size=64"):
        evit_patch.apply(model, layers=[1], keep=0.7, img_size=64)
    fast = evit_patch.apply(model, layers=[1], keep=0.5)
    with pytest.raises(
        evit_patch.UnsupportedInputError,
        match=r"^CLIPVisionModelWithProjection was patched by evit_patch: output_attentions",
    ):
        fast(x, output_attentions=True)


@pytest.mark.parametrize("cls_name", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
@pytest.mark.parametrize("option", ["output_hidden_states", "output_attentions"])
def test_config_flag_set_after_patching_is_refused_at_call_time(option, cls_name):
    """A flag flipped in the config after patching would return a truncated, misaligned tuple (transformers
    itself refuses output_attentions with sdpa)."""
    implementation = "eager" if option == "output_attentions" else "sdpa"
    fast = evit_patch.apply(small_hf_clip(cls_name, implementation), layers=[1, 2], keep=0.5)
    setattr(fast.config, option, True)
    with pytest.raises(
        evit_patch.UnsupportedInputError,
        match=rf"^{cls_name} was patched by evit_patch: {option} cannot be honoured .* leave config\.{option} False$",
    ):
        fast(clip_images(1))
