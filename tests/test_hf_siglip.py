"""transformers ``SiglipVisionModel``: no class token (received-attention score) and an attention-pooling
head whose probe weighs a fused or merged token as the tokens it stands for."""

from __future__ import annotations

import copy
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import images
from reference import reference_forward_siglip
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tracked import NoSizeBias

import evit_patch
from evit_patch.errors import UnsupportedModelError

transformers = pytest.importorskip("transformers")

IMPLEMENTATIONS = ["sdpa", "eager"]


def _small(implementation: str = "sdpa", dtype=torch.float64, depth: int = 4, **options):
    """A small random-init tower; the head's probe and attention re-drawn at a scale where its
    softmax is far from uniform (transformers initialises them small)."""
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(
        image_size=64,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=depth,
        num_attention_heads=4,
        intermediate_size=128,
        attn_implementation=implementation,
        **options,
    )
    model = transformers.SiglipVisionModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("head.") and ("probe" in name or "in_proj_weight" in name):
                p.normal_(0, 0.5)
    return model.to(dtype).eval()


def _pooled(model, x):
    return model(x).pooler_output


@pytest.mark.parametrize("method", ["evit", "merge"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_reference(implementation, method):
    model, x = _small(implementation), images(2, size=64)
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_keep_one_is_bitwise_identical(implementation, dtype):
    """Bitwise: the traced layers issue transformers' kernels, and the head runs its own
    nn.MultiheadAttention, without a mask while no token has moved."""
    model, x = _small(implementation, dtype), images(2, size=64, dtype=dtype)
    fast = evit_patch.apply(model, layers=[0, 1, 2, 3], keep=1.0)
    with torch.no_grad():
        got, want = fast(x), model(x)
    assert torch.equal(got.pooler_output, want.pooler_output)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)


def test_size_awareness_changes_the_embedding():
    model, x = _small(), images(2, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    with torch.no_grad():
        weighted = _pooled(fast, x)
        fast.head.evit_bias = NoSizeBias()
        assert (_pooled(fast, x) - weighted).abs().max() > 1e-3


def test_gradients_match_reference():
    model, x = _small(), images(2, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.6, method="merge")
    _pooled(fast, x).square().sum().backward()
    reference_forward_siglip(model, x, [1, 2], 0.6, method="merge")[1].square().sum().backward()
    got = dict(fast.named_parameters())
    for name, p in model.named_parameters():
        assert got[name].grad is not None, name
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-7, atol=1e-9, msg=name)


def test_original_untouched_and_state_dict_keys_kept():
    model = _small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.7)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(fast.state_dict()) == list(before)
    assert type(fast) is type(model) and not model._forward_hooks


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_explain_equals_counted_macs(implementation):
    model, x = _small(implementation), images(1, size=64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5)
    report = evit_patch.explain(fast)
    assert report.pool_macs_patched < report.pool_macs_original
    for m, expected in ((model, report.macs_original), (fast, report.macs_patched)):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            m(x)
        assert counter.get_total_flops() // 2 == expected


def test_concurrent_calls():
    fast = evit_patch.apply(_small(depth=3), layers=[1, 2], keep=0.5, method="merge")
    x = images(2, size=64)
    inputs = [x[i % 2][None] * (1 + i / 8) for i in range(8)]
    with torch.no_grad():
        alone = [_pooled(fast, image) for image in inputs]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda image: _pooled(fast, image), inputs))
    for got, want in zip(together, alone):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_fullgraph_compile_matches_eager():
    import torch._dynamo
    from torch._dynamo.utils import counters

    fast = evit_patch.apply(_small(dtype=torch.float32, depth=3), layers=[1, 2], keep=0.7)
    x = images(2, size=64, dtype=torch.float32)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x).pooler_output, _pooled(fast, x), rtol=1e-4, atol=1e-4)
    assert dict(counters["graph_break"]) == {}


def test_export_matches_eager():
    fast = evit_patch.apply(_small(dtype=torch.float32, depth=3), layers=[1, 2], keep=0.7, method="merge")
    x = images(3, size=64, dtype=torch.float32)
    program = evit_patch.export_program(fast, x[:2])
    for batch in (1, 3):
        with torch.no_grad():
            got, want = program.module()(x[:batch]), fast(x[:batch])
        torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_pickle_round_trip():
    fast = evit_patch.apply(_small(), layers=[1, 2], keep=0.5)
    x = images(2, size=64)
    with torch.no_grad():
        loaded = pickle.loads(pickle.dumps(fast))
        got, want = loaded(x), fast(x)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=0)
    assert got.last_hidden_state.shape[-1] == 64
    assert evit_patch.get_config(loaded) == evit_patch.get_config(fast)


def test_output_capture_is_refused_at_call_time():
    fast = evit_patch.apply(_small(), layers=[1, 2], keep=0.5)
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
        evit_patch.apply(_small(vision_use_head=False))


def test_copy_keeps_the_hook_per_model():
    """The hook that strips the state is the copy's own: the original has none, a deep copy its own."""
    model = _small()
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

    fast = evit_patch.apply(_small(dtype=torch.float32, depth=3), layers=[1, 2], keep=0.5, method="merge")
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
