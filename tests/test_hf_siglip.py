"""transformers ``SiglipVisionModel``: no class token (received-attention score) and an attention-pooling
head whose probe weighs a fused or merged token as the tokens it stands for."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import small_hf_siglip
from conftest import images
from reference import reference_forward_siglip
from tracked import NoSizeBias, check_macs

import evit_patch
from evit_patch.errors import UnsupportedModelError

transformers = pytest.importorskip("transformers")


def _pooled(model, x):
    return model(x).pooler_output


@pytest.mark.parametrize("method", ["evit", "merge"])
def test_eager_attention_matches_reference(method):
    """transformers' float32 eager softmax, the score read from it (the family table runs sdpa)."""
    model, x = small_hf_siglip("eager"), images(2, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=[0.6, 0.5], method=method)
    with torch.no_grad():
        out, original = fast(x), model(x)
        hidden, pooled = reference_forward_siglip(model, x, [1, 2], [0.6, 0.5], method=method)
    assert type(out) is type(original)
    assert (out.pooler_output - original.pooler_output).abs().max() > 1e-3  # the patch changes the embedding ...
    torch.testing.assert_close(out.pooler_output, pooled, rtol=0, atol=1e-9)  # ... exactly as the reference
    tokens = 21 if method == "evit" else 20  # 64 -> 39 (+ 1 fused) -> 20 (+ 1 fused); merging: 64 -> 39 -> 20
    assert out.last_hidden_state.shape == (2, tokens, 64)  # the library's width: the state channels stripped
    for b in range(2):
        torch.testing.assert_close(out.last_hidden_state[b], hidden[b], rtol=0, atol=1e-9)


@pytest.mark.parametrize(  # (sdpa, float32): the family table
    "implementation, dtype", [("sdpa", torch.float64), ("eager", torch.float64), ("eager", torch.float32)], ids=str
)
def test_keep_one_is_bitwise_identical(implementation, dtype):
    """Bitwise: the traced layers issue transformers' kernels, and the head runs its own
    nn.MultiheadAttention, without a mask while no token has moved."""
    model, x = small_hf_siglip(implementation, dtype), images(2, size=64, dtype=dtype)
    fast = evit_patch.apply(model, layers=[0, 1, 2, 3], keep=1.0)
    with torch.no_grad():
        got, want = fast(x), model(x)
    assert torch.equal(got.pooler_output, want.pooler_output)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)


def test_size_awareness_changes_the_embedding():
    model, x = small_hf_siglip(), images(2, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    with torch.no_grad():
        weighted = _pooled(fast, x)
        fast.head.evit_bias = NoSizeBias()
        assert (_pooled(fast, x) - weighted).abs().max() > 1e-3


def test_head_keys_and_values_shrink_with_the_tokens():
    """explain counts the head's keys and values at the final token count (the family table checks
    its totals against FlopCounterMode)."""
    report = evit_patch.explain(evit_patch.apply(small_hf_siglip(), layers=[1, 2], keep=0.5))
    assert report.pool_macs_patched < report.pool_macs_original


def test_eager_attention_explain_equals_counted_macs():
    check_macs(small_hf_siglip("eager"), images(1, size=64))


def test_output_capture_is_refused_at_call_time():
    fast = evit_patch.apply(small_hf_siglip(), layers=[1, 2], keep=0.5)
    with pytest.raises(evit_patch.UnsupportedInputError, match="output_hidden_states cannot be honoured"):
        fast(images(1, size=64), output_hidden_states=True)
    fast.config.output_hidden_states = True  # set after patching: refused when called, not served truncated
    with pytest.raises(
        evit_patch.UnsupportedInputError,
        match=r"^SiglipVisionModel was patched by evit_patch: output_hidden_states .* leave config\.output_hidden",
    ):
        fast(images(1, size=64))


def test_headless_tower_is_refused():
    with pytest.raises(
        UnsupportedModelError,
        match=r"^SiglipVisionModel has no attention-pooling head \(vision_use_head=False\): its only output is "
        r"the tokens, which EViT drops and fuses; expected vision_use_head=True$",
    ):
        evit_patch.apply(small_hf_siglip(vision_use_head=False))


def test_copy_keeps_the_hook_per_model():
    """The hook that strips the state is the copy's own: the original has none, a deep copy its own."""
    model = small_hf_siglip()
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    twin = copy.deepcopy(fast)
    x = images(1, size=64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x).pooler_output, fast(x).pooler_output, rtol=0, atol=0)
    assert len(fast._forward_hooks) == 1 and not model._forward_hooks


def test_onnx_matches_eager(tmp_path):
    """Both outputs export with standard ops, the head's nn.MultiheadAttention and its size mask
    included (the exporter names the first output ``logits``: it is ``last_hidden_state``). timm's
    'map' head (SDPA with the size mask) exported and matched too when checked by hand; its test
    here is torch.export, which the ONNX exporter runs first."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from evit_patch.deploy.export import INPUT_NAME, STANDARD_ONNX_DOMAINS, export_onnx, onnx_op_types, onnx_session

    fast = evit_patch.apply(small_hf_siglip(dtype=torch.float32, depth=3), layers=[1, 2], keep=0.5, method="merge")
    x = images(3, size=64, dtype=torch.float32)
    path = export_onnx(fast, tmp_path / "siglip.onnx", x[:2])
    assert set(onnx_op_types(path)) <= STANDARD_ONNX_DOMAINS
    session = onnx_session(path)
    for batch in (1, 3):
        hidden, pooled = session.run(None, {INPUT_NAME: x[:batch].numpy()})
        with torch.no_grad():
            want = fast(x[:batch])
        torch.testing.assert_close(torch.from_numpy(pooled), want.pooler_output, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(hidden), want.last_hidden_state, rtol=0, atol=1e-4)
