"""Hugging Face transformers DINOv2 (with and without registers): exact EViT and merging against
the per-sample float64 reference, and the genuine DeiT-Tiny weights in ``Dinov2Model``."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import DINOV2_MODELS, DINOV2_SIZE, dinov2_images, small_hf_dinov2
from reference import assert_patches_like_timm, reference_forward_hf_encoder

import evit_patch

transformers = pytest.importorskip("transformers")


def _outputs(out) -> dict[str, torch.Tensor]:
    return {key: value for key, value in out.items() if value is not None}


def _main(model, x):
    """The embedding users compare: ``pooler_output``, or a classifier's logits."""
    out = model(x)
    return out.logits if "logits" in out else out.pooler_output


@pytest.mark.parametrize(  # registers_classifier, EViT and merging: the family table
    "name, method", [("plain", "evit"), ("registers", "evit"), ("classifier", "evit"), ("registers", "merge")]
)
def test_matches_reference(name, method):
    model, x = small_hf_dinov2(name), dinov2_images()
    fast = evit_patch.apply(model, layers=[1, 2], keep=[0.6, 0.5], method=method)
    with torch.no_grad():
        got, original = _outputs(fast(x)), _outputs(model(x))
        want = reference_forward_hf_encoder(model, x, [1, 2], [0.6, 0.5], method=method)
    assert got.keys() == want.keys()
    main = "logits" if "logits" in got else "pooler_output"
    assert (got[main] - original[main]).abs().max() > 1e-3  # the patch changes the output ...
    for key, value in want.items():  # ... exactly as the reference does
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-9, msg=key)
    if "last_hidden_state" in got:  # 36 image tokens -> 22 + 1 fused -> 12 (+ 1): the surviving tokens
        prefix = 1 + DINOV2_MODELS[name][1]
        assert got["last_hidden_state"].shape == (3, prefix + (13 if method == "evit" else 11), 32)
        assert torch.equal(got["pooler_output"], got["last_hidden_state"][:, 0])


@pytest.mark.parametrize("name, method", [("plain", "evit"), ("registers_classifier", "merge")])
def test_eager_attention_matches_reference(name, method):
    model, x = small_hf_dinov2(name, "eager"), dinov2_images()
    fast = evit_patch.apply(model, layers=[1, 3], keep=0.5, method=method)
    with torch.no_grad():
        got, want = _main(fast, x), reference_forward_hf_encoder(model, x, [1, 3], 0.5, method=method)
    torch.testing.assert_close(got, want.get("logits", want.get("pooler_output")), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "name, implementation, dtype",
    [
        ("plain", "sdpa", torch.float64),
        ("plain", "eager", torch.float32),
        ("registers_classifier", "eager", torch.float64),  # (registers_classifier, sdpa, float32): the table
    ],
    ids=str,
)
def test_keep_one_is_bitwise_identical(name, implementation, dtype):
    """Bitwise: the traced attention issues the same kernels as transformers' sdpa/eager functions."""
    model, x = small_hf_dinov2(name, implementation, dtype), dinov2_images(2, dtype)
    fast = evit_patch.apply(model, layers=[0, 1, 2, 3], keep=1.0, method="merge")
    with torch.no_grad():
        got, want = _outputs(fast(x)), _outputs(model(x))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_drop_path_keeps_following_train_mode():
    """Stochastic depth stays a module (not traced in eval mode): off in eval, random in training."""
    model, x = small_hf_dinov2("plain", drop_path_rate=0.5), dinov2_images(2)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    assert type(fast.encoder.layer[1].drop_path).__name__ == "Dinov2DropPath"
    with torch.no_grad():
        torch.testing.assert_close(
            fast(x).pooler_output,
            reference_forward_hf_encoder(model, x, [1, 2], 0.5)["pooler_output"],
            rtol=0,
            atol=1e-9,
        )
        fast.train()
        assert not torch.equal(fast(x).pooler_output, fast(x).pooler_output)


def test_outputs_keep_their_transformers_type():
    model, x = small_hf_dinov2("registers"), dinov2_images(2)
    fast = evit_patch.apply(model, layers=[1], keep=0.5)
    with torch.no_grad():
        out, as_tuple = fast(x), fast(x, return_dict=False)
    assert type(out) is type(model(x)) and type(out).__name__ == "BaseModelOutputWithPooling"
    assert all(torch.equal(a, b) for a, b in zip(as_tuple, out.to_tuple(), strict=True))


def test_position_embeddings_are_interpolated_per_call():
    """At its own size DINOv2 adds its position table as is; at another it interpolates it on each
    call, and the patched model, whose keep counts follow the token count, still equals the reference."""
    model = small_hf_dinov2("plain")
    embeddings = model.embeddings
    assert (
        embeddings.interpolate_pos_encoding(torch.zeros(1, 37, 32), DINOV2_SIZE, DINOV2_SIZE)
        is embeddings.position_embeddings
    )
    x = dinov2_images(2, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    with torch.no_grad():
        got, want = fast(x), reference_forward_hf_encoder(model, x, [1, 2], 0.5)
    assert got.last_hidden_state.shape == (2, 1 + 17 + 1, 32)  # 64 image tokens -> 32 + 1 -> 17 + 1
    torch.testing.assert_close(got.pooler_output, want["pooler_output"], rtol=0, atol=1e-9)


def test_unsupported_configurations_are_refused():
    model, x = small_hf_dinov2("plain"), dinov2_images(1)
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"configured 48x48 input only \(explain .* img_size=64"):
        evit_patch.apply(model, layers=[1], keep=0.7, img_size=64)
    fast = evit_patch.apply(model, layers=[1], keep=0.5)
    with pytest.raises(
        evit_patch.UnsupportedInputError, match=r"^Dinov2Model was patched by evit_patch: output_hidden_states"
    ):
        fast(x, output_hidden_states=True)
    fast.config.output_hidden_states = True
    with pytest.raises(
        evit_patch.UnsupportedInputError, match=r"^Dinov2Model was patched by evit_patch: output_hidden_states .* leave"
    ):
        fast(x)
    fast.config.output_hidden_states = False
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"attn_implementation='flex_attention'; expected one"):
        evit_patch.apply(model, layers=[1], keep=0.7)


def timm_to_hf_dinov2(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The key mapping from a timm ViT/DeiT state dict (no layer scale) to transformers'
    ``Dinov2Model``: q, k, v split from ``qkv``, layer scales of ones (``layerscale_value=1.0``)."""
    channels = state["cls_token"].shape[-1]
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": torch.zeros(1, channels),
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for i in range(depth):
        layer = f"encoder.layer.{i}"
        qkv_w, qkv_b = state[f"blocks.{i}.attn.qkv.weight"].chunk(3), state[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), qkv_w, qkv_b):
            out[f"{layer}.attention.{name}.weight"], out[f"{layer}.attention.{name}.bias"] = w, b
        for hf, tm in {
            "attention.o_proj": "attn.proj",
            "norm1": "norm1",
            "norm2": "norm2",
            "mlp.fc1": "mlp.fc1",
        }.items():
            for kind in ("weight", "bias"):
                out[f"{layer}.{hf}.{kind}"] = state[f"blocks.{i}.{tm}.{kind}"]
        for kind in ("weight", "bias"):
            out[f"{layer}.mlp.fc2.{kind}"] = state[f"blocks.{i}.mlp.fc2.{kind}"]
        out[f"{layer}.layer_scale1.lambda1"] = out[f"{layer}.layer_scale2.lambda1"] = torch.ones(channels)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["evit", "merge"])
def test_real_deit_tiny_weights_in_dinov2_give_the_timm_patched_embedding(real_model, real_val_images, method):
    """The genuine DeiT-Tiny in transformers' ``Dinov2Model``: its ``pooler_output`` is timm's
    pre-logits ([CLS] after the final norm), and patched at keep 0.7 @ 3, 6, 9 the two agree again
    (at 224 px DINOv2 adds its position table without interpolating it)."""
    config = transformers.Dinov2Config(
        image_size=224,
        patch_size=16,
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        mlp_ratio=4,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    hf = transformers.Dinov2Model(config)
    hf.load_state_dict(timm_to_hf_dinov2(real_model.state_dict(), 12), strict=True)
    timm_model = copy.deepcopy(real_model)
    timm_model.reset_classifier(0)  # timm's output is then its pre-logits: [CLS] after the norm
    count = 3
    x = real_val_images[0][:count]
    assert_patches_like_timm(hf, timm_model, x, logits=lambda m, x: m(x).pooler_output, method=method)
