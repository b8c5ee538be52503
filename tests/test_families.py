"""Every supported family x every shared check (as timm's test_models): one table of families, each
with its small random-init float64 model, its images, its explicit reference and what its outputs
are, crossed with the checks in ``tracked.py``, for EViT and merging. A check that cannot apply to a
family is excluded in ``NOT_APPLICABLE`` with the reason; a check a family fails that it should pass
is a finding in ``FINDINGS`` (a strict xfail, which fails once the library is fixed). The family
files keep what is particular to one family: its variants, refusals and behaviours."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from cases import (
    clip_images,
    dinov2_images,
    eva_images,
    open_clip_images,
    small_beit,
    small_eva,
    small_gap,
    small_hf,
    small_hf_clip,
    small_hf_dinov2,
    small_hf_siglip,
    small_map,
    small_open_clip,
    small_open_clip_pooled,
    small_relpos,
    small_torchvision,
    small_vit,
)
from conftest import images
from reference import (
    reference_forward_hf,
    reference_forward_hf_encoder,
    reference_forward_siglip,
    reference_forward_torchvision,
    reference_forward_tracked,
)
from tracked import (
    check_compile,
    check_export,
    check_gradient_checkpointing,
    check_gradients,
    check_keep_one_is_exact,
    check_macs,
    check_matches_reference,
    check_original_untouched,
    check_permutation,
    check_pickle,
    check_threads,
    enable_timm_checkpointing,
    named_outputs,
)

import evit_patch


def _images64(batch, dtype=torch.float64):
    return images(batch, size=64, dtype=dtype)


def _tracked(kind):
    return lambda model, x, layers, keep, fuse=True, method="evit": reference_forward_tracked(
        kind, model, x, layers, keep, fuse, method=method
    )


def _fields(reference, *keys):
    """A reference that returns a dict, restricted to the fields the model returns."""

    def run(model, x, layers, keep, fuse=True, method="evit"):
        out = reference(model, x, layers, keep, fuse, method=method)
        return {key: out[key] for key in keys}

    return run


def _named(reference, key):
    """A reference that returns one tensor, named as the model's output field."""
    return lambda model, x, layers, keep, fuse=True, method="evit": {
        key: reference(model, x, layers, keep, fuse, method=method)
    }


def _siglip(model, x, layers, keep, fuse=True, method="evit"):
    assert fuse, "SigLIP's reference always fuses (the head weighs the fused token by its size)"
    hidden, pooled = reference_forward_siglip(model, x, layers, keep, method=method)
    return {"last_hidden_state": torch.stack(hidden), "pooler_output": pooled}


@dataclass(frozen=True)
class Case:
    make: Callable[..., torch.nn.Module]  # make(dtype=torch.float64): the small random-init model
    images: Callable[..., torch.Tensor]  # images(batch, dtype=torch.float64)
    reference: Callable  # reference(model, x, layers, keep, fuse=True, method="evit") -> named outputs
    select: Callable = named_outputs  # the model's output -> the named outputs the reference gives
    main: str = "out"  # the output the patch must move, whose square the gradient checks differentiate
    keep_one_rtol: float = 0.0  # keep=1: 0 for bitwise, else within rtol x the largest output (float32)
    gather: str | None = None  # position-aware: the token_state function re-indexing its position tables
    checkpointing: Callable | None = enable_timm_checkpointing
    requires: str | None = None  # the optional library the family comes from


# Three blocks: patched at 1 and 2, block 2 attends over reduced tokens (merging: with their sizes) and
# the last reorganized tokens reach the head; a fourth block would add time, not another path.
DEPTH = 3

# nn.MultiheadAttention re-expressed with SDPA: its fused kernel and SDPA round differently (float32).
MHA_ROUNDING = 1e-6

CASES = {
    "timm_vit": Case(  # a class token, token-pooled
        lambda dtype=torch.float64: small_vit(dtype, depth=DEPTH), _images64, _tracked("vit")
    ),
    "timm_gap": Case(  # no class token, global_pool='avg'
        lambda dtype=torch.float64: small_gap(dtype=dtype, depth=DEPTH), _images64, _tracked("vit")
    ),
    "timm_map": Case(  # global_pool='map': the probe weighs sizes
        lambda dtype=torch.float64: small_map(dtype=dtype, depth=DEPTH), _images64, _tracked("vit")
    ),
    "timm_beit": Case(
        lambda dtype=torch.float64: small_beit(dtype, depth=DEPTH), _images64, _tracked("beit"), gather="gather_bias"
    ),
    "timm_eva": Case(
        lambda dtype=torch.float64: small_eva(dtype=dtype, depth=DEPTH),
        lambda batch, dtype=torch.float64: eva_images("eva02", dtype, batch),
        _tracked("eva"),
        gather="gather_rope",
    ),
    "timm_relpos": Case(  # an MLP bias, average-pooled
        lambda dtype=torch.float64: small_relpos(dtype=dtype, depth=DEPTH),
        _images64,
        _tracked("relpos"),
        gather="gather_bias",
    ),
    "torchvision": Case(
        lambda dtype=torch.float64: small_torchvision(dtype, DEPTH),
        _images64,
        reference_forward_torchvision,
        keep_one_rtol=MHA_ROUNDING,
        checkpointing=None,
    ),
    "hf_deit": Case(  # DeiT with teacher: two prefix tokens, the two heads averaged
        lambda dtype=torch.float64: small_hf("DeiTForImageClassificationWithTeacher", dtype=dtype, depth=DEPTH),
        _images64,
        _named(reference_forward_hf, "logits"),
        select=lambda out: {"logits": out.logits},
        main="logits",
        checkpointing=None,
        requires="transformers",
    ),
    "hf_dinov2": Case(  # registers, and a head over [CLS] and the size-weighted mean of the image tokens
        lambda dtype=torch.float64: small_hf_dinov2("registers_classifier", dtype=dtype, depth=DEPTH),
        lambda batch, dtype=torch.float64: dinov2_images(batch, dtype),
        reference_forward_hf_encoder,
        main="logits",
        checkpointing=None,
        requires="transformers",
    ),
    "hf_clip": Case(
        lambda dtype=torch.float64: small_hf_clip(dtype=dtype, depth=DEPTH),
        lambda batch, dtype=torch.float64: clip_images(batch, dtype),
        _fields(reference_forward_hf_encoder, "image_embeds", "last_hidden_state"),
        main="image_embeds",
        checkpointing=None,
        requires="transformers",
    ),
    "hf_siglip": Case(  # no class token, an attention-pooling head
        lambda dtype=torch.float64: small_hf_siglip(dtype=dtype, depth=DEPTH),
        _images64,
        _siglip,
        main="pooler_output",
        checkpointing=None,
        requires="transformers",
    ),
    "open_clip_avg": Case(
        lambda dtype=torch.float64: small_open_clip("avg", dtype, layers=DEPTH),
        lambda batch, dtype=torch.float64: open_clip_images(batch, dtype),
        _tracked("open_clip"),
        keep_one_rtol=MHA_ROUNDING,
        requires="open_clip",
    ),
    "open_clip_attn_pool": Case(  # CoCa's attentional pooler: its probe weighs sizes
        lambda dtype=torch.float64: small_open_clip_pooled("tok", dtype, layers=DEPTH),
        lambda batch, dtype=torch.float64: open_clip_images(batch, dtype),
        _tracked("open_clip"),
        keep_one_rtol=MHA_ROUNDING,
        requires="open_clip",
    ),
}

# check: the methods it runs for. Merging runs where what is checked is the reduction's own computation
# (its tokens, gradients, MACs, the graph at keep=1) or its deployable graph (torch.export with a dynamic
# batch, where its argmax and index_add meet symbolic shapes). EViT alone, to keep the suite's time:
# compile (merging's fullgraph capture is test_compile.py's, through inductor), and threads, pickle and
# checkpointing, which check that the state travels in the tokens, carried the same way for both methods
# (merging's size bias through pickle: test_pickle.py).
CHECKS = {
    "reference": ("evit", "merge"),
    "keep_one": ("evit", "merge"),
    "permutation": ("evit",),  # the reduction is replaced by a permutation: no method is left to vary
    "gradients": ("evit", "merge"),
    "macs": ("evit", "merge"),
    "compile": ("evit",),
    "export": ("evit", "merge"),
    "threads": ("evit",),
    "pickle": ("evit",),
    "checkpointing": ("evit",),
    "untouched": ("evit",),  # the original is copied before any method is chosen
}

# (family, check): why the check cannot apply.
NOT_APPLICABLE = {
    ("torchvision", "checkpointing"): "torchvision's VisionTransformer has no gradient-checkpointing switch",
    **{
        (name, "checkpointing"): (
            "documented limitation (docs/faq.md: 'Patched layers do not use gradient checkpointing'): transformers "
            "checkpoints GradientCheckpointingLayer.forward, and a patched layer is an fx copy of the unwrapped "
            "forward, so activation_checkpointing_enable() re-runs only the layers before the first patched one"
        )
        for name in ("hf_deit", "hf_dinov2", "hf_clip", "hf_siglip")
    },
}

# (family, check, method): a check the family should pass and does not; strict xfails for the library to fix.
FINDINGS: dict[tuple[str, str, str], str] = {}

# (family, check, method): covered by the same check with the other method, and why that covers it (the
# suite's time: each export costs seconds). Merging's export of a family carries every state EViT's does
# (sizes for its pools, positions for its tables) through the same rewritten attention and head, plus its
# size bias; what EViT adds is its reduction (TopK, the fused token), which is family-independent except
# where the fused token meets position tables: EViT's export stays for timm_vit (the plain graph),
# hf_deit (a transformers layer) and the position-aware families (and test_onnx.py exports EViT on
# BEiT, EVA-02 and an average-pooled ViT).
EXPORTED_BY_MERGING_ONLY = ("timm_gap", "timm_map", "torchvision", "hf_dinov2", "hf_clip", "hf_siglip")
COVERED_BY_OTHER_METHOD = {
    (name, "export", "evit"): "merging's export of this family covers the family's exported graph (see above)"
    for name in (*EXPORTED_BY_MERGING_ONLY, "open_clip_avg", "open_clip_attn_pool")
}


def params(check: str) -> list:
    """``(family, method)`` for every family and method the check runs for; findings xfail (strict)."""
    out = []
    for name in CASES:
        if (name, check) in NOT_APPLICABLE:
            continue
        for method in CHECKS[check]:
            if (name, check, method) in COVERED_BY_OTHER_METHOD:
                continue
            marks = []
            if check in SHARING:  # one worker builds the family's shared model (xdist --dist loadgroup)
                marks.append(pytest.mark.xdist_group(f"family-{name}"))
            if (name, check, method) in FINDINGS:
                marks.append(pytest.mark.xfail(strict=True, reason=FINDINGS[(name, check, method)]))
            out.append(pytest.param(name, method, id=f"{name}-{method}", marks=marks))
    return out


def _case(name: str) -> Case:
    case = CASES[name]
    if case.requires:
        pytest.importorskip(case.requires)
    return case


LAYERS, KEEP = [1, 2], [0.6, 0.5]  # a keep rate per layer: the shared model's plan
SHARING = ("reference", "macs", "threads", "pickle")  # the checks that run _shared's models


@functools.cache
def _shared(name: str, method: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The family's float64 model and its copy patched at ``KEEP`` @ ``LAYERS``, built once per worker
    for the checks that only run them (reference, MACs, threads, pickle) and leave both as they were;
    the checks that train, re-wire or re-check ``apply`` itself patch a model of their own."""
    model = _case(name).make()
    return model, evit_patch.apply(model, layers=LAYERS, keep=KEEP, method=method)


def test_every_family_gets_every_check():
    """The table is complete: each (family, check) runs, or is excluded with a reason."""
    assert all(reason for reason in NOT_APPLICABLE.values()) and all(reason for reason in FINDINGS.values())
    assert {check for _, check in NOT_APPLICABLE} <= set(CHECKS) and {n for n, _ in NOT_APPLICABLE} <= set(CASES)
    assert {(n, c) for n, c, _ in FINDINGS} <= {(n, c) for n in CASES for c in CHECKS} - set(NOT_APPLICABLE)
    for name, check, method in COVERED_BY_OTHER_METHOD:  # the other method still runs the check on the family
        assert (
            (name, check) not in NOT_APPLICABLE
            and set(CHECKS[check]) - {method}
            and (name, check, method) not in FINDINGS
        )
    no_switch = {name for name, case in CASES.items() if case.checkpointing is None}
    assert no_switch == {name for name, check in NOT_APPLICABLE if check == "checkpointing"}
    checks = {name.removeprefix("test_") for name, f in globals().items() if name.startswith("test_") and callable(f)}
    assert checks - {"every_family_gets_every_check"} == set(CHECKS)


@pytest.mark.parametrize("name, method", params("reference"))
def test_reference(name, method):
    case = _case(name)
    model, fast = _shared(name, method)
    options = dict(select=case.select, main=case.main, method=method, fast=fast)
    check_matches_reference(case.reference, model, case.images(3), LAYERS, KEEP, **options)


@pytest.mark.parametrize("name, method", params("keep_one"))
def test_keep_one(name, method):
    case = _case(name)
    model, x = case.make(dtype=torch.float32), case.images(2, torch.float32)
    check_keep_one_is_exact(model, x, select=case.select, rtol=case.keep_one_rtol, layers=range(DEPTH), method=method)


@pytest.mark.parametrize("name, method", params("permutation"))
def test_permutation(name, method, monkeypatch):
    """Every family gives the original output with its tokens reordered; a position-aware one no
    longer does once its position tables are read in the new order."""
    case = _case(name)
    check_permutation(case.make(), case.images(2), monkeypatch, case.gather, select=case.select, main=case.main)


@pytest.mark.parametrize("name, method", params("gradients"))
def test_gradients(name, method):
    case = _case(name)
    check_gradients(case.reference, case.make(), case.images(2), select=case.select, main=case.main, method=method)


@pytest.mark.parametrize("name, method", params("macs"))
def test_macs(name, method):
    model, fast = _shared(name, method)
    check_macs(model, _case(name).images(1), fast=fast)


@pytest.mark.parametrize("name, method", params("compile"))
def test_compile(name, method):
    case = _case(name)
    check_compile(case.make(dtype=torch.float32), case.images(2, torch.float32), select=case.select, method=method)


@pytest.mark.parametrize("name, method", params("export"))
def test_export(name, method):
    case = _case(name)
    check_export(case.make(dtype=torch.float32), case.images(3, torch.float32), select=case.select, method=method)


@pytest.mark.parametrize("name, method", params("threads"))
def test_threads(name, method):
    case = _case(name)
    model, fast = _shared(name, method)
    check_threads(model, case.images(2), select=case.select, fast=fast)


@pytest.mark.parametrize("name, method", params("pickle"))
def test_pickle(name, method):
    case = _case(name)
    model, fast = _shared(name, method)
    check_pickle(model, case.images(2), select=case.select, fast=fast)


@pytest.mark.parametrize("name, method", params("checkpointing"))
def test_checkpointing(name, method):
    case = _case(name)
    check_gradient_checkpointing(
        case.make(), case.images(2), enable=case.checkpointing, select=case.select, main=case.main, method=method
    )


@pytest.mark.parametrize("name, method", params("untouched"))
def test_untouched(name, method):
    check_original_untouched(_case(name).make())
