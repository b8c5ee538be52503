"""Hugging Face transformers ViT/DeiT: layers traced with a registry-free attention on the same Linears."""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import small_hf
from conftest import images
from reference import assert_patches_like_timm, reference_forward_hf
from tracked import check_gradients, check_macs

import evit_patch

transformers = pytest.importorskip("transformers")

IMPLEMENTATIONS = ["sdpa", "eager"]
CLASSIFIERS = ["ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"]
TABLE = ("DeiTForImageClassificationWithTeacher", "sdpa")  # the family table's model (test_families.py)


def _logits(model, x):
    return model(x).logits


@pytest.mark.parametrize(
    "cls_name, implementation", [(c, i) for c in CLASSIFIERS for i in IMPLEMENTATIONS if (c, i) != TABLE]
)
def test_matches_reference(cls_name, implementation):
    model, x = small_hf(cls_name, implementation), images(3, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=[0.6, 0.5])
    with torch.no_grad():
        got, want = _logits(fast, x), reference_forward_hf(model, x, [1, 2], [0.6, 0.5])
    assert got.abs().max() > 0.1  # the head is not zero
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("cls_name", ["ViTModel", "DeiTModel"])
def test_bare_model_matches_reference(cls_name, implementation):
    model, x = small_hf(cls_name, implementation), images(2, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    with torch.no_grad():
        out, (hidden, pooled) = fast(x), reference_forward_hf(model, x, [1, 2], 0.5)
    prefix = 2 if cls_name == "DeiTModel" else 1
    assert out.last_hidden_state.shape == (2, prefix + 17 + 1, 64)  # 64 image tokens -> 32 + 1 fused -> 17 + 1
    torch.testing.assert_close(out.last_hidden_state, hidden, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.pooler_output, pooled, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "cls_name, implementation, dtype",
    [
        (c, i, d)
        for c in ("ViTForImageClassification", "DeiTForImageClassificationWithTeacher")
        for i in IMPLEMENTATIONS
        for d in (torch.float64, torch.float32)
        if (c, i, d) != (*TABLE, torch.float32)
    ],
    ids=str,
)
def test_keep_one_is_bitwise_identical(cls_name, implementation, dtype):
    """Bitwise: the traced attention issues the same kernels as transformers' sdpa/eager functions."""
    model, x = small_hf(cls_name, implementation, dtype), images(2, size=64, dtype=dtype)
    fast = evit_patch.apply(model, layers=[0, 1, 2, 3], keep=1.0)
    with torch.no_grad():
        assert torch.equal(_logits(fast, x), _logits(model, x))


def test_eager_attention_gradients_match_reference():
    """Through transformers' float32 eager softmax (the family table runs sdpa)."""
    model, x = small_hf("DeiTForImageClassificationWithTeacher", "eager"), images(2, size=64)
    check_gradients(reference_forward_hf, model, x, select=lambda out: {"out": out.logits})


def test_patched_copy_keeps_the_transformers_classes_and_its_own_config():
    model = small_hf("DeiTForImageClassificationWithTeacher")
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.7)
    assert type(model.deit.layers[1]).__name__ == "DeiTLayer"
    assert type(model.deit.layers[1].attention).__name__ == "DeiTAttention"
    assert isinstance(fast, transformers.DeiTForImageClassificationWithTeacher) and fast.config is not model.config


def test_outputs_keep_their_transformers_type():
    """transformers 5 ``ModelOutput`` has no ``to_dict``; it is a dict, and ``return_dict=False`` a tuple."""
    model, x = small_hf("DeiTForImageClassificationWithTeacher"), images(2, size=64)
    fast = evit_patch.apply(model, layers=[1], keep=0.5)
    with torch.no_grad():
        out, as_tuple = fast(x), fast(x, return_dict=False)
    assert type(out).__name__ == "DeiTForImageClassificationWithTeacherOutput"
    assert list(dict(out)) == ["logits", "cls_logits", "distillation_logits"]
    torch.testing.assert_close(out.logits, (out.cls_logits + out.distillation_logits) / 2, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(as_tuple, out.to_tuple(), strict=True))


def test_eager_attention_explain_equals_counted_macs():
    check_macs(small_hf("DeiTForImageClassificationWithTeacher", "eager"), images(1, size=64))


def test_call_time_options_are_refused():
    """Asked in the call or set in the config after patching, output capture is refused at call time
    (a flipped config flag would otherwise return a truncated, misaligned tuple)."""
    model, x = small_hf(), images(1, size=64)
    fast = evit_patch.apply(model, layers=[1], keep=0.5)
    who = r"ViTForImageClassification was patched by evit_patch: "
    with pytest.raises(evit_patch.UnsupportedInputError, match=who + "output_hidden_states cannot be honoured"):
        fast(x, output_hidden_states=True)
    with pytest.raises(evit_patch.UnsupportedInputError, match=who + "output_attentions cannot"):
        evit_patch.apply(small_hf(implementation="eager"), layers=[1], keep=0.5)(x, output_attentions=True)
    torch.testing.assert_close(fast(x, output_hidden_states=False, output_attentions=False).logits, fast(x).logits)
    fast.config.output_hidden_states = True
    with pytest.raises(evit_patch.UnsupportedInputError, match=who + r"output_hidden_states .* leave config\."):
        fast(x)
    assert fast(x, output_hidden_states=False).hidden_states is None  # an explicit False wins, as in transformers
    fast.config.output_hidden_states = False
    mask = torch.ones(1, 65)
    mask[0, 5] = 0
    with pytest.raises(
        evit_patch.UnsupportedInputError, match=who + "it cannot honour a caller-supplied attention_mask"
    ):
        fast(x, attention_mask=mask)
    torch.testing.assert_close(fast(x, attention_mask=torch.ones(1, 65)).logits, fast(x).logits)  # no-op mask


def test_gradient_checkpointing_warns_once_that_patched_layers_are_not_checkpointed():
    """transformers checkpoints its own layer classes (HF Trainer(gradient_checkpointing=True) turns it on):
    the patched layers are traced graphs it does not reach, which a training run is told once per model."""
    fast, x = evit_patch.apply(small_hf(), layers=[1, 2], keep=0.5), images(2, size=64)
    want = torch.autograd.grad(fast(x).logits.square().sum(), list(fast.parameters()))
    fast.activation_checkpointing_enable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast(x)  # eval mode: nothing to checkpoint, nothing said
        fast.train()
        with torch.no_grad():
            fast(x)  # no backward, nothing said
    message = (
        r"^ViTForImageClassification was patched by evit_patch: gradient checkpointing is on, but only layers "
        r"before 1 are checkpointed; the patched layers 1-3 are traced graphs that transformers does not checkpoint"
    )
    with pytest.warns(UserWarning, match=message) as caught:
        got = torch.autograd.grad(fast(x).logits.square().sum(), list(fast.parameters()))
        fast(x)
    assert len([w for w in caught if "gradient checkpointing" in str(w.message)]) == 1  # once per model
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)  # dropout is 0 in _small: same gradients


def test_unsupported_configurations_are_refused():
    model = small_hf()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"attn_implementation='flex_attention'; expected one"):
        evit_patch.apply(model, layers=[1], keep=0.7)
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"ViTForMaskedImageModeling is not supported .* grid"):
        evit_patch.apply(transformers.ViTForMaskedImageModeling(small_hf().config), layers=[1], keep=0.7)
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"configured 64x64 input only .* img_size=96"):
        evit_patch.apply(small_hf(), layers=[1], keep=0.7, img_size=96)
    model = small_hf()
    model.config.output_hidden_states = True
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"config\.output_hidden_states=True"):
        evit_patch.apply(model, layers=[1], keep=0.7)


def timm_to_hf_vit(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The key mapping from a timm ViT/DeiT state dict to transformers' ViTForImageClassification."""
    out = {
        "vit.embeddings.cls_token": state["cls_token"],
        "vit.embeddings.position_embeddings": state["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "vit.layernorm.weight": state["norm.weight"],
        "vit.layernorm.bias": state["norm.bias"],
        "classifier.weight": state["head.weight"],
        "classifier.bias": state["head.bias"],
    }
    for i in range(depth):
        qkv_w, qkv_b = state[f"blocks.{i}.attn.qkv.weight"].chunk(3), state[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), qkv_w, qkv_b):
            out[f"vit.layers.{i}.attention.{name}.weight"], out[f"vit.layers.{i}.attention.{name}.bias"] = w, b
        for hf, tm in {
            "attention.o_proj": "attn.proj",
            "layernorm_before": "norm1",
            "layernorm_after": "norm2",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }.items():
            for kind in ("weight", "bias"):
                out[f"vit.layers.{i}.{hf}.{kind}"] = state[f"blocks.{i}.{tm}.{kind}"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("implementation, method", [("sdpa", "evit"), ("eager", "merge")], ids=lambda v: str(v))
def test_real_deit_tiny_weights_give_the_timm_patched_output(real_model, real_val_images, implementation, method):
    """The genuine DeiT-Tiny in transformers' ViT class, patched, equals the patched timm model
    (merging with eager attention compares the k^T operand of q @ k^T; transformers' eager
    softmax runs in float32, hence the looser tolerance there)."""
    config = transformers.ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        num_labels=1000,
        layer_norm_eps=1e-6,
        attn_implementation=implementation,
    )
    hf = transformers.ViTForImageClassification(config)
    hf.load_state_dict(timm_to_hf_vit(real_model.state_dict(), 12), strict=True)
    atol = 1e-9 if implementation == "sdpa" else 1e-5
    count = 3 if method == "evit" else 2
    assert_patches_like_timm(hf, real_model, real_val_images[0][:count], logits=_logits, atol=atol, method=method)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: transformers.BeitForImageClassification(
                transformers.BeitConfig(
                    image_size=32,
                    patch_size=8,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=64,
                )
            ),
            r"BeitForImageClassification is not supported by evit_patch: .* timm's beit_\* \(supported\)",
        ),
    ],
    ids=["beit"],
)
def test_other_transformers_models_are_refused_by_name(build, message):
    with pytest.raises(evit_patch.UnsupportedModelError, match=message):
        evit_patch.apply(build(), layers=[0], keep=0.7)
