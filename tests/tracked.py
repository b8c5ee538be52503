"""The checks every family passes, each against the hand-written per-sample references in
``reference.py``: ``test_families.py`` crosses them with every family's small model, the family files
call them for what is particular to one family. Outputs are compared by name (``named_outputs``), so a
transformers ``ModelOutput`` is checked field by field."""

from __future__ import annotations

import copy
import logging
import pickle
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from reference import reference_forward_tracked
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import evit_patch
from evit_patch import token_state
from evit_patch.reductions.base import Permutation


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Give position tables, layer scales, query/key projections and the head real magnitudes: at
    their init (zeros, 1e-5 or 0.1 scales, near-uniform attention) a wrong position or a wrong
    pool would barely move the output."""
    keys = ("relative_position_bias_table", "gamma", "head.", "cls_token", "reg_token", "qkv.weight", "q_proj.weight")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in keys):
                p.normal_(0, 0.5 if "weight" not in name else 0.2)
    return model


def named_outputs(y) -> dict[str, torch.Tensor]:
    """A model's output as named tensors: a tensor is ``"out"``, a tuple ``"0"``, ``"1"``, ..., a dict
    (transformers' ``ModelOutput``) its fields that are not ``None``."""
    if isinstance(y, torch.Tensor):
        return {"out": y}
    if isinstance(y, Mapping):
        return {key: value for key, value in y.items() if value is not None}
    return {str(i): value for i, value in enumerate(y) if value is not None}


def assert_outputs_close(got, want, *, rtol=0.0, atol=0.0, select=named_outputs):
    """Every named output of ``got`` (through ``select``) equals ``want``'s (a reference's: named as is)."""
    got, want = select(got), named_outputs(want)
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=rtol, atol=atol, msg=key)


def _reference(kind):
    """A reference forward: a ``reference_forward_tracked`` kind, or a callable
    ``(model, x, layers, keep, fuse, **options)``."""
    if callable(kind):
        return kind
    return lambda model, x, layers, keep, fuse=True, **options: reference_forward_tracked(
        kind, model, x, layers, keep, fuse, **options
    )


def check_matches_reference(
    kind, model, x, layers, keep, fuse=True, *, select=named_outputs, main="out", fast=None, **options
):
    """``options``: ``method``, ``proportional``, ``score``, passed to ``apply`` and the reference;
    ``main``: the output the patch must move (token outputs change length, not only values); ``fast``:
    ``model`` already patched with these arguments (shared between checks that leave it as it is)."""
    fast = evit_patch.apply(model, layers=layers, keep=keep, fuse=fuse, **options) if fast is None else fast
    with torch.no_grad():
        want = _reference(kind)(model, x, layers, keep, fuse, **options)
        got, original = fast(x), select(model(x))
        assert (select(got)[main] - original[main]).abs().max() > 1e-3  # the patch changes the output ...
        assert_outputs_close(got, want, atol=1e-9, select=select)  # ... exactly as the reference does


def check_keep_one_is_exact(model, x, *, select=named_outputs, rtol: float = 0.0, layers=range(4), **options):
    """Patched everywhere (``layers``) at keep 1.0, the model is the original: bitwise, or within ``rtol``
    of the largest output where the family re-expresses its attention with other kernels."""
    fast = evit_patch.apply(model, layers=list(layers), keep=1.0, **options)
    with torch.no_grad():
        got, want = select(fast(x)), select(model(x))
    assert got.keys() == want.keys()
    for key, value in want.items():
        if rtol:
            assert (got[key] - value).abs().max() <= rtol * value.abs().max(), key
        else:
            assert torch.equal(got[key], value), key


def check_permutation(model, x, monkeypatch, gather: str | None, *, select=named_outputs, main="out"):
    """Keep every token but reorder them by score: with positions followed (and attention and pools
    blind to the order), the pooled output ``main`` is the original's; with ``gather`` disabled
    (position tables read in the new order), it is not. Call it last in a test: the monkeypatch lasts
    until the test ends."""
    fast = evit_patch.apply(model, layers=[1, 2], keep=1.0)
    for reorganizer in evit_patch.reorganizers(fast):
        reorganizer.reduction = Permutation()
    with torch.no_grad():
        original = select(model(x))[main]
        torch.testing.assert_close(select(fast(x))[main], original, rtol=0, atol=1e-12)
        if gather is not None:
            monkeypatch.setattr(token_state, gather, lambda table, index: table)
            assert (select(fast(x))[main] - original).abs().max() > 1e-3


def check_gradients(kind, model, x, *, select=named_outputs, main="out", **options):
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.6, **options)
    select(fast(x))[main].square().sum().backward()
    named_outputs(_reference(kind)(model, x, [1, 2], 0.6, **options))[main].square().sum().backward()
    got = dict(fast.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:  # unused by this configuration (e.g. a head-less pre-logits path)
            continue
        assert got[name].grad is not None, name
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-7, atol=1e-9, msg=name)


def check_original_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.7)
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(fast.state_dict()) == list(before)
    fast.load_state_dict(before, strict=True)
    assert type(fast) is type(model)


def check_macs(model, x, *, fast=None, **options):
    """``explain``'s analytic MACs equal what FlopCounterMode counts, original and patched. With grad
    enabled: without it nn.MultiheadAttention takes a fused fast path the counter misses, and timm's
    ``latent.expand`` (global_pool='map') fails the counter's module hooks. ``fast``: ``model`` already
    patched (by default: at keep 0.5 @ 1, 2)."""
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, **options) if fast is None else fast
    report = evit_patch.explain(fast)
    for m, expected in ((model, report.macs_original), (fast, report.macs_patched)):
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            m(x[:1])
        assert counter.get_total_flops() // 2 == expected


def check_compile(model, x, *, backend: str = "aot_eager", select=named_outputs, **options):
    """``torch.compile(fullgraph=True)`` captures the patched model whole and matches eager.

    ``aot_eager`` by default: dynamo's capture (where graph breaks happen) and AOT autograd's
    functionalization are what differ between families; inductor's C++ code generation, which costs
    seconds per model on a cold cache, is run by test_compile.py (EViT and merging on a small ViT).
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    fast = evit_patch.apply(copy.deepcopy(model).float(), layers=[1, 2], keep=0.7, **options)
    x = x.float()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        compiled = torch.compile(fast, fullgraph=True, backend=backend)
        assert_outputs_close(compiled(x), select(fast(x)), rtol=1e-4, atol=1e-4, select=select)
    assert dict(counters["graph_break"]) == {}


def check_threads(model, x, *, select=named_outputs, fast=None, **options):
    """One patched model called from 8 threads at once gives every caller its own answer: positions
    and sizes travel with the tokens, nothing is shared between calls. ``fast``: ``model`` already
    patched (by default: at keep 0.5 @ 1, 2)."""
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, **options) if fast is None else fast
    inputs = [x[i % len(x)][None] * (1 + i / 8) for i in range(16)]
    with torch.no_grad():
        alone = [select(fast(image)) for image in inputs]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda image: fast(image), inputs))
    for got, want in zip(together, alone):  # threads may split a matmul's sums differently: 1e-15 apart
        assert_outputs_close(got, want, atol=1e-10, select=select)


def check_export(model, x, *, select=named_outputs, **options):
    """``torch.export`` traces the state carried in the tokens and the exported program equals
    eager on other batch sizes."""
    fast = evit_patch.apply(copy.deepcopy(model).float(), layers=[1, 2], keep=0.7, **options)
    exported = evit_patch.export_program(fast, x[:2].float()).module()
    for batch in (1, 3):
        with torch.no_grad():
            want = select(fast(x[:batch].float()))
            assert_outputs_close(exported(x[:batch].float()), want, rtol=1e-5, atol=1e-5, select=select)


def check_pickle(model, x, *, select=named_outputs, fast=None, **options):
    """A pickled and unpickled patched model (its blocks re-traced) is the same model: same outputs,
    same configuration. ``fast``: ``model`` already patched (by default: at keep 0.5 @ 1, 2)."""
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.5, **options) if fast is None else fast
    with torch.no_grad():
        expected = select(fast(x))
        loaded = pickle.loads(pickle.dumps(fast))
        assert_outputs_close(loaded(x), expected, select=select)
    assert evit_patch.get_config(loaded) == evit_patch.get_config(fast)


def check_onnx(model, x, tmp_path, **options):
    """The ONNX file (standard ops only) run by onnxruntime equals eager on another batch size,
    every output included (transformers' outputs are flattened in their field order)."""
    import pytest

    pytest.importorskip("onnxscript", reason='needs the onnx extra: pip install "evit_patch[onnx]"')
    from evit_patch.deploy.export import INPUT_NAME, STANDARD_ONNX_DOMAINS, onnx_op_types, onnx_session

    fast = evit_patch.apply(copy.deepcopy(model).float(), layers=[1, 2], keep=0.7, **options)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("onnx_ir").addHandler(handler)
    try:
        path = evit_patch.export_onnx(fast, tmp_path / "patched.onnx", x[:2].float())
    finally:
        logging.getLogger("onnx_ir").removeHandler(handler)
    assert [r.getMessage() for r in records if "ambiguous" in r.getMessage()] == []  # issue 23: merging's noise
    assert set(onnx_op_types(path)) <= STANDARD_ONNX_DOMAINS
    got = onnx_session(path).run(None, {INPUT_NAME: x[:3].float().numpy()})
    with torch.no_grad():
        want = fast(x[:3].float())
    want = [v for v in want.values() if v is not None] if isinstance(want, dict) else [want]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=0, atol=1e-4)


def enable_timm_checkpointing(model):
    model.set_grad_checkpointing(True)


def check_gradient_checkpointing(
    model, x, *, enable=enable_timm_checkpointing, select=named_outputs, main="out", **options
):
    """Checkpointing re-runs blocks during backward (the patched ones included: their reorganizers
    run again); with no state outside the tokens, the gradients are the ones computed without it.
    In eval mode (some test models have dropout) unless ``enable`` sets training mode, as transformers
    checkpoints only in training."""
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.7, **options).eval()
    calls = []
    for reorganizer in evit_patch.reorganizers(fast):
        reorganizer.register_forward_hook(lambda module, args, output: calls.append(module.layer))
    select(fast(x))[main].square().sum().backward()
    want = {name: p.grad.clone() for name, p in fast.named_parameters() if p.grad is not None}
    assert sorted(calls) == [1, 2]
    fast.zero_grad()
    calls.clear()
    enable(fast)
    select(fast(x))[main].square().sum().backward()
    assert sorted(calls) == [1, 1, 2, 2], f"reorganizers ran at layers {sorted(calls)}: blocks not re-run in backward"
    for name, grad in want.items():
        torch.testing.assert_close(dict(fast.named_parameters())[name].grad, grad, rtol=1e-9, atol=1e-12, msg=name)


class NoSizeBias(torch.nn.Module):
    """Stand-in for an attention pool's ``evit_bias`` that ignores the sizes: the head then counts
    every token once (what the size bias is measured against)."""

    def forward(self, sizes, like):
        return None


class PlainMean(torch.nn.Module):
    """Stand-in for the final norm's ``evit_pool``: a plain mean over the surviving tokens."""

    def forward(self, x, sizes, num_prefix_tokens):
        return x
