"""Hugging Face transformers DINOv2 (with and without registers): exact EViT and merging against
the per-sample float64 reference, and the genuine DeiT-Tiny weights in ``Dinov2Model``."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import images
from reference import assert_patches_like_timm, reference_forward_hf_encoder
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tracked import check_compile, check_export, check_onnx, check_original_untouched

import evit_patch

transformers = pytest.importorskip("transformers")

MODELS = {  # name: (class, register tokens)
    "plain": ("Dinov2Model", 0),
    "registers": ("Dinov2WithRegistersModel", 2),
    "classifier": ("Dinov2ForImageClassification", 0),
    "registers_classifier": ("Dinov2WithRegistersForImageClassification", 2),
}
SIZE = 48  # 6 x 6 patches of 8


def _small(name="registers", implementation="sdpa", dtype=torch.float64, **config):
    """A small random-init model whose layer scales, tokens, position embeddings, q/k projections
    and head are re-drawn at magnitudes where a wrong token, scale or weight moves the output
    (transformers initialises them at 1, 0 or std 0.02)."""
    cls_name, registers = MODELS[name]
    torch.manual_seed(0)
    config_cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    options = dict(num_register_tokens=registers) if registers else {}
    config = config_cls(
        image_size=SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        num_labels=5,
        attn_implementation=implementation,
        **options | config,
    )
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lambda1" in key:
                p.normal_(1, 0.5)
            elif any(k in key for k in ("token", "position_embeddings", "classifier", "q_proj.weight", "k_proj")):
                p.normal_(0, 0.3)
    return model.to(dtype).eval()


def _x(batch=3, dtype=torch.float64, size=SIZE):
    return images(batch, size, dtype=dtype)


def _outputs(out) -> dict[str, torch.Tensor]:
    return {key: value for key, value in out.items() if value is not None}


def _main(model, x):
    """The embedding users compare: ``pooler_output``, or a classifier's logits."""
    out = model(x)
    return out.logits if "logits" in out else out.pooler_output


@pytest.mark.parametrize(
    "name, method", [(name, "evit") for name in MODELS] + [("registers", "merge"), ("classifier", "merge")]
)
def test_matches_reference(name, method):
    model, x = _small(name), _x()
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
        prefix = 1 + MODELS[name][1]
        assert got["last_hidden_state"].shape == (3, prefix + (13 if method == "evit" else 11), 32)
        assert torch.equal(got["pooler_output"], got["last_hidden_state"][:, 0])


@pytest.mark.parametrize("name, method", [("plain", "evit"), ("registers_classifier", "merge")])
def test_eager_attention_matches_reference(name, method):
    model, x = _small(name, "eager"), _x()
    fast = evit_patch.apply(model, layers=[1, 3], keep=0.5, method=method)
    with torch.no_grad():
        got, want = _main(fast, x), reference_forward_hf_encoder(model, x, [1, 3], 0.5, method=method)
    torch.testing.assert_close(got, want.get("logits", want.get("pooler_output")), rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["evit", "merge"])
def test_gradients_match_reference(method):
    model, x = _small("registers_classifier"), _x(2)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.6, method=method)
    _main(fast, x).square().sum().backward()
    reference_forward_hf_encoder(model, x, [1, 2], 0.6, method=method)["logits"].square().sum().backward()
    got = dict(fast.named_parameters())
    for key, p in model.named_parameters():
        if p.grad is None:  # the mask token: only used with bool_masked_pos
            assert "mask_token" in key
            continue
        torch.testing.assert_close(got[key].grad, p.grad, rtol=1e-7, atol=1e-9, msg=key)


@pytest.mark.parametrize(
    "name, implementation, dtype",
    [
        ("plain", "sdpa", torch.float64),
        ("plain", "eager", torch.float32),
        ("registers_classifier", "sdpa", torch.float32),
        ("registers_classifier", "eager", torch.float64),
    ],
    ids=str,
)
def test_keep_one_is_bitwise_identical(name, implementation, dtype):
    """Bitwise: the traced attention issues the same kernels as transformers' sdpa/eager functions."""
    model, x = _small(name, implementation, dtype), _x(2, dtype)
    fast = evit_patch.apply(model, layers=[0, 1, 2, 3], keep=1.0, method="merge")
    with torch.no_grad():
        got, want = _outputs(fast(x)), _outputs(model(x))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_drop_path_keeps_following_train_mode():
    """Stochastic depth stays a module (not traced in eval mode): off in eval, random in training."""
    model, x = _small("plain", drop_path_rate=0.5), _x(2)
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
    model, x = _small("registers"), _x(2)
    fast = evit_patch.apply(model, layers=[1], keep=0.5)
    with torch.no_grad():
        out, as_tuple = fast(x), fast(x, return_dict=False)
    assert type(out) is type(model(x)) and type(out).__name__ == "BaseModelOutputWithPooling"
    assert all(torch.equal(a, b) for a, b in zip(as_tuple, out.to_tuple(), strict=True))


def test_position_embeddings_are_interpolated_per_call():
    """At its own size DINOv2 adds its position table as is; at another it interpolates it on each
    call, and the patched model, whose keep counts follow the token count, still equals the reference."""
    model = _small("plain")
    embeddings = model.embeddings
    assert embeddings.interpolate_pos_encoding(torch.zeros(1, 37, 32), SIZE, SIZE) is embeddings.position_embeddings
    x = _x(2, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    with torch.no_grad():
        got, want = fast(x), reference_forward_hf_encoder(model, x, [1, 2], 0.5)
    assert got.last_hidden_state.shape == (2, 1 + 17 + 1, 32)  # 64 image tokens -> 32 + 1 -> 17 + 1
    torch.testing.assert_close(got.pooler_output, want["pooler_output"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name, method", [("registers", "evit"), ("classifier", "merge")])
def test_explain_equals_counted_macs(name, method):
    model = _small(name)
    patched = evit_patch.apply(model, layers=[1, 2], keep=0.5, method=method)
    report, x = evit_patch.explain(patched), _x(1)
    for m, expected in ((model, report.macs_original), (patched, report.macs_patched)):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            m(x)
        assert counter.get_total_flops() // 2 == expected


def test_original_untouched_and_state_dict_keys_kept():
    check_original_untouched(_small("registers_classifier"))


def test_fullgraph_compile_matches_eager():
    check_compile(_small("registers"), _x(2), method="merge")


def test_export_matches_eager():
    check_export(_small("registers_classifier"), _x(3), method="merge")


@pytest.mark.slow  # the ONNX exporter takes ~10 s on a tiny model; torch.export above is the fast check
def test_onnx_matches_eager(tmp_path):
    check_onnx(_small("registers_classifier"), _x(3), tmp_path, method="merge")


def test_unsupported_configurations_are_refused():
    model, x = _small("plain"), _x(1)
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"Dinov2Backbone is not supported .* into a grid"):
        evit_patch.apply(transformers.Dinov2Backbone(model.config), layers=[1], keep=0.7)
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
    count = 6 if method == "evit" else 3
    x = real_val_images[0][:count]
    assert_patches_like_timm(hf, timm_model, x, logits=lambda m, x: m(x).pooler_output, method=method)
