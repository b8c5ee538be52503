"""Hugging Face transformers CLIP vision towers: exact EViT and merging against the per-sample
float64 reference; ``pooler_output`` (``post_layernorm`` of [CLS]) and ``image_embeds`` are the
embeddings users compare, ``last_hidden_state`` holds the surviving tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import images
from reference import reference_forward_hf_encoder
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tracked import check_compile, check_export, check_onnx, check_original_untouched

import evit_patch

transformers = pytest.importorskip("transformers")

SIZE = 48  # 6 x 6 patches of 8
CLASSES = ["CLIPVisionModel", "CLIPVisionModelWithProjection"]


def _config(implementation="sdpa"):
    return transformers.CLIPVisionConfig(
        image_size=SIZE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        projection_dim=16,
        attn_implementation=implementation,
    )


def _small(cls_name="CLIPVisionModelWithProjection", implementation="sdpa", dtype=torch.float64):
    """A small random-init tower; q/k projections re-drawn larger, so attention is far from uniform
    and a wrong ranking moves the output."""
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(_config(implementation))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if any(k in key for k in ("q_proj.weight", "k_proj.weight", "class_embedding", "position_embedding")):
                p.normal_(0, 0.3)
    return model.to(dtype).eval()


def _x(batch=3, dtype=torch.float64):
    return images(batch, SIZE, dtype=dtype)


def _outputs(out) -> dict[str, torch.Tensor]:
    return {key: value for key, value in out.items() if value is not None}


def _embedding(model, x):
    out = model(x)
    return out.image_embeds if "image_embeds" in out else out.pooler_output


@pytest.mark.parametrize("method", ["evit", "merge"])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_matches_reference(cls_name, method):
    model, x = _small(cls_name), _x()
    fast = evit_patch.apply(model, layers=[1, 3], keep=[0.6, 0.5], method=method)
    with torch.no_grad():
        got, original = _outputs(fast(x)), _outputs(model(x))
        want = reference_forward_hf_encoder(model, x, [1, 3], [0.6, 0.5], method=method)
    main = "image_embeds" if "image_embeds" in got else "pooler_output"
    assert (got[main] - original[main]).abs().max() > 1e-3  # the patch changes the embedding ...
    for key, value in got.items():  # ... exactly as the reference does
        torch.testing.assert_close(value, want[key], rtol=0, atol=1e-9, msg=key)
    # 36 image tokens -> 22 + 1 fused -> 12 + 1 (merging: 22 -> 11); the last layer packs no state
    assert got["last_hidden_state"].shape == (3, 1 + (13 if method == "evit" else 11), 32)


@pytest.mark.parametrize("method", ["evit", "merge"])
def test_eager_attention_matches_reference(method):
    """transformers' eager CLIP attention takes its softmax in float32 (the reference too): agreement
    to float32 rounding, not 1e-9."""
    model, x = _small("CLIPVisionModel", "eager"), _x()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, method=method)
    with torch.no_grad():
        got, want = fast(x).pooler_output, reference_forward_hf_encoder(model, x, [1, 2], 0.5, method=method)
    torch.testing.assert_close(got, want["pooler_output"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["evit", "merge"])
def test_gradients_match_reference(method):
    model, x = _small(), _x(2)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.6, method=method)
    _embedding(fast, x).square().sum().backward()
    reference_forward_hf_encoder(model, x, [1, 2], 0.6, method=method)["image_embeds"].square().sum().backward()
    got = dict(fast.named_parameters())
    for key, p in model.named_parameters():
        assert p.grad is not None, key
        torch.testing.assert_close(got[key].grad, p.grad, rtol=1e-7, atol=1e-9, msg=key)


@pytest.mark.parametrize(
    "cls_name, implementation, dtype",
    [
        ("CLIPVisionModel", "sdpa", torch.float32),
        ("CLIPVisionModel", "eager", torch.float64),
        ("CLIPVisionModelWithProjection", "sdpa", torch.float64),
        ("CLIPVisionModelWithProjection", "eager", torch.float32),
    ],
    ids=str,
)
def test_keep_one_is_bitwise_identical(cls_name, implementation, dtype):
    """Bitwise: the traced attention issues the same kernels as transformers' sdpa/eager functions."""
    model, x = _small(cls_name, implementation, dtype), _x(2, dtype)
    fast = evit_patch.apply(model, layers=[0, 1, 2, 3], keep=1.0, method="merge")
    with torch.no_grad():
        got, want = _outputs(fast(x)), _outputs(model(x))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_outputs_keep_their_transformers_type():
    model, x = _small(), _x(2)
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
    config = transformers.CLIPConfig(text_config=text, vision_config=_config().to_dict(), projection_dim=16)
    model = transformers.CLIPModel(config).double().eval()
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"holds CLIPVisionModel at 'vision_model'; pass"):
        evit_patch.apply(model, layers=[1], keep=0.5)
    tower = evit_patch.apply(model.vision_model, layers=[1, 2], keep=0.5)
    x = _x(2)
    with torch.no_grad():
        want = model.visual_projection(
            reference_forward_hf_encoder(model.vision_model, x, [1, 2], 0.5)["pooler_output"]
        )
        model.vision_model = tower
        torch.testing.assert_close(model.get_image_features(x).pooler_output, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["evit", "merge"])
def test_explain_equals_counted_macs(method):
    model = _small()
    patched = evit_patch.apply(model, layers=[1, 2], keep=0.5, method=method)
    report, x = evit_patch.explain(patched), _x(1)
    for m, expected in ((model, report.macs_original), (patched, report.macs_patched)):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            m(x)
        assert counter.get_total_flops() // 2 == expected


def test_original_untouched_and_state_dict_keys_kept():
    check_original_untouched(_small())


def test_fullgraph_compile_matches_eager():
    check_compile(_small(), _x(2), method="merge")


def test_export_matches_eager():
    check_export(_small(), _x(3), method="merge")


@pytest.mark.slow  # the ONNX exporter takes ~10 s on a tiny model; torch.export above is the fast check
def test_onnx_matches_eager(tmp_path):
    check_onnx(_small(), _x(3), tmp_path, method="merge")


def test_unsupported_configurations_are_refused():
    with pytest.raises(
        evit_patch.UnsupportedModelError,
        match=r"CLIPForImageClassification is not supported .* \(patch model\.vision_model",
    ):
        config = transformers.CLIPConfig(vision_config=_config().to_dict())
        evit_patch.apply(transformers.CLIPForImageClassification(config), layers=[1], keep=0.7)
    model, x = _small(), _x(1)
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"configured 48x48 input only .* img_size=64"):
        evit_patch.apply(model, layers=[1], keep=0.7, img_size=64)
    fast = evit_patch.apply(model, layers=[1], keep=0.5)
    with pytest.raises(
        evit_patch.UnsupportedInputError,
        match=r"^CLIPVisionModelWithProjection was patched by evit_patch: output_attentions",
    ):
        fast(x, output_attentions=True)


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("option", ["output_hidden_states", "output_attentions"])
def test_config_flag_set_after_patching_is_refused_at_call_time(option, cls_name):
    """A flag flipped in the config after patching would return a truncated, misaligned tuple (transformers
    itself refuses output_attentions with sdpa)."""
    implementation = "eager" if option == "output_attentions" else "sdpa"
    fast = evit_patch.apply(_small(cls_name, implementation), layers=[1, 2], keep=0.5)
    setattr(fast.config, option, True)
    with pytest.raises(
        evit_patch.UnsupportedInputError,
        match=rf"^{cls_name} was patched by evit_patch: {option} cannot be honoured .* leave config\.{option} False$",
    ):
        fast(_x(1))
