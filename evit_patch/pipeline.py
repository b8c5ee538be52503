"""``apply``: the one verb. Copy, trace and locate, profile, plan, rewrite, verify (token counts and outputs).

The caller's model is never touched: every step works on the copy, and a refusal at any step
leaves nothing half-patched.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .config import EViTConfig, PlanOptions
from .errors import InvalidPlanError
from .families import describe, find_family
from .families.discovered import ATTRIBUTE as DISCOVERED_ATTR
from .families.discovered import DiscoveredFamily
from .graph.outputs import verify_outputs
from .graph.profile import PROFILE_ATTR, TracedBlock, profile_of, trace_blocks
from .graph.rewrite import insert
from .graph.state import CONFIG_ATTR, check_not_patched
from .graph.verify import runs_cheaply, verify_token_counts
from .graph.wiring import wire
from .options import Method, Score
from .planning.budget import default_layers, plan_for_budget, target_fraction
from .planning.explain import CostModel
from .planning.schedule import plan_searched

DEFAULT_KEEP = 0.7


def apply(
    model: nn.Module,
    layers: int | Iterable[int] | None = None,
    keep: float | Iterable[float] | None = None,
    *,
    fuse: bool = True,
    flops: float | None = None,
    speedup: float | None = None,
    img_size: int | tuple[int, int] | None = None,
    score: str | Score | None = None,
    method: str | Method = Method.EVIT,
    proportional: bool | None = None,
    cls_only: bool | None = None,
    dense: bool | None = None,
    progress: bool = True,
) -> nn.Module:
    """Return an EViT copy of ``model`` that reorganizes tokens after attention at ``layers``.

    The copy is the same class as ``model`` with the chosen blocks replaced by traced graphs
    that hold a :class:`TokenReorganizer`; parameters, ``state_dict`` keys and attributes
    (``pretrained_cfg``, ``num_classes``, ...) are unchanged. Blocks are traced in eval mode: an
    attention dropout inside fused SDPA is fixed to off (pretrained ViTs have none); dropout and
    drop-path modules keep following ``.train()``/``.eval()``.

    Args:
        model: a supported vision transformer (see :func:`list_supported`).
        layers: 0-indexed blocks that reorganize; default D/4, D/2, 3D/4 (3, 6, 9 of 12), or
            with ``method="merge"`` and a budget, every block from D/4 on (3-11 of 12).
        keep: fraction of image tokens kept at each layer, one rate or one per layer, in (0, 1];
            default 0.7 unless a budget is given.
        fuse: fuse the dropped tokens into one extra token (EViT's inattentive fusion).
        flops: instead of ``keep``, a MAC budget as a fraction of the original (see :func:`plan`).
        speedup: instead of ``keep``, a FLOP-ideal speedup budget.
        img_size: patch a copy resized to this input size (timm's position-embedding
            interpolation); with ``flops=1.0`` it runs at the original's cost.
        score: what ranks the image tokens: ``"cls"``, the [CLS] token's attention (EViT), or
            ``"received"``, the attention each token receives from every query (the only choice
            without a class token; it costs one ``N x N`` map at each reorganizing block). ``None``:
            ``"cls"`` where the model has a class token. See docs/how-it-works.md for measurements.
        method: ``"evit"`` (default: the paper's EViT, exactly), ``"merge"`` (each token not kept is
            averaged into its most similar kept token; later blocks use proportional attention), or
            ``"dam"``: keep the tokens both attended and unlike any other, merge the rest; under a
            budget its schedule (where reduction starts, how fast it ramps in) is searched on
            synthetic images. Without fine-tuning, ``apply(model, flops=0.5, method="dam")`` stays
            closest to the original at the same MACs (docs/training-free.md).
        proportional: add ``log(size)`` to later attention logits, so a token standing for many
            patches draws their attention; ``None``: the method's default (on for ``"merge"`` and
            ``"dam"``, off for ``"evit"``).
        cls_only: run the last block's MLP on the class token(s) alone: exact, up to float rounding,
            for a head that reads only them, and it saves most of that block. ``None``: on for budgets
            planned by ``method="dam"`` where it is exact, off otherwise.
        dense: carry which token stands for each original patch, so block outputs can be restored to
            the full patch grid: :func:`restore`, timm's ``forward_intermediates`` and
            ``get_intermediate_layers``, transformers' ``output_hidden_states`` and backbone feature maps
            (docs/dense.md). ``None``: on for backbones (their output is a feature map), off otherwise.
        progress: show a progress bar while a budget's schedule is searched (``method="dam"``).

    Raises:
        UnsupportedModelError: the model or a block cannot be patched soundly (nothing changed).
        InvalidPlanError: ``layers``/``keep`` are malformed for this model, or the budget is infeasible.
    """
    check_not_patched(model)
    family = find_family(model)
    family.check(model)
    where = describe(model)
    options = PlanOptions.build(
        method=method, fuse=fuse, score=score, proportional=proportional, cls_only=cls_only, dense=dense, where=where
    ).resolve_dense(family.feature_maps(model), where)
    budget = flops is not None or speedup is not None
    if budget and keep is not None:
        raise InvalidPlanError(f"{where}: give keep or a budget (flops/speedup), not both")
    fraction = target_fraction(flops, speedup, resized=img_size is not None) if budget else None
    # One pipeline, one trace: copy -> trace and locate -> profile -> plan -> rewrite -> verify.
    patched, traced, fake, reference = _traced_copy(model, family, img_size)
    if budget:
        size = None if img_size is None else ((img_size, img_size) if isinstance(img_size, int) else tuple(img_size))
        profile = profile_of(traced, patched, family)
        cost = CostModel(profile, family.num_tokens(patched, size), family.outside_macs(patched, size), size)
        # The original's cost at its own size: the same blocks (a resize changes no block's
        # structure), so the same profile at the native token count; no second trace.
        native = cost if img_size is None else CostModel(profile, family.num_tokens(model), family.outside_macs(model))
        target = fraction * native.macs_original
        if layers is None and options.reduction_class.searches_schedule:
            config, _ = plan_searched(reference, family, cost, target, options, where=where, progress=progress)
        else:
            config = plan_for_budget(cost, target_macs=target, layers=layers, options=options, where=where)
    else:
        num_blocks = len(traced)
        layers = default_layers(num_blocks, options) if layers is None else layers
        keep = DEFAULT_KEEP if keep is None else keep
        config = EViTConfig.build(layers, keep, options, num_blocks=num_blocks, where=where)
    return _rewrite(reference, patched, traced, config, family, fake)


def patch_with(model: nn.Module, config: EViTConfig, family=None, *, img_size=None) -> nn.Module:
    """Patch a copy of ``model`` with a validated ``config`` (``apply`` after planning)."""
    family = family or find_family(model)
    patched, traced, fake, reference = _traced_copy(model, family, img_size)
    return _rewrite(reference, patched, traced, config, family, fake)


def _traced_copy(model: nn.Module, family, img_size) -> tuple[nn.Module, list[TracedBlock], FakeTensorMode, nn.Module]:
    """The copy to patch (resized if asked), its traced, located blocks, the fake-tensor mode
    their shapes were propagated in (verify reuses it: each parameter is faked once), and the
    unpatched model at the copy's size (the original, or another resized copy) that the patched
    copy's outputs are checked against."""
    source = model if img_size is None else family.resized(model, img_size)
    patched = copy.deepcopy(source)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    return patched, trace_blocks(patched, family, fake), fake, source


def _rewrite(
    model: nn.Module, patched: nn.Module, traced: list[TracedBlock], config: EViTConfig, family, fake: FakeTensorMode
) -> nn.Module:
    """Wire (decide), insert (edit the copy's graphs), verify, and label the patched copy.

    ``model``: the unpatched model at the copy's input size (the output check's reference)."""
    score = _score(model, family, config.score)
    profile = profile_of(traced, patched, family)  # before the head is wrapped: its costs are the original's
    wiring = wire(patched, family, traced, config, score)
    insert(patched, family, traced, wiring)
    # Guards first: the checks below run the model as users will (a dense backbone's own encoder loop).
    family.install_guards(patched, min(config.layers), dense=config.dense)
    explained = CostModel(profile, family.num_tokens(patched), outside_macs=0).explain(config)
    counts, real = [row.tokens_in for row in explained.rows], runs_cheaply(patched, explained.macs_original)
    reduced_output = verify_token_counts(patched, family, counts, mode=fake, real=real)
    exact = not config.cls_only and not any(t.reexpressed for t in traced)  # cls_only: one-row MLP, other rounding
    verify_outputs(model, patched, family, reduced_output, exact=exact)
    if isinstance(family, DiscoveredFamily):
        setattr(patched, DISCOVERED_ATTR, family)
    setattr(patched, PROFILE_ATTR, profile)
    setattr(patched, CONFIG_ATTR, config.replace(score=None if score is family.score(model) else score))
    return patched


def _score(model: nn.Module, family, requested: Score | None) -> Score:
    default = family.score(model)
    if requested is None:
        return default
    if requested is Score.CLS and default is Score.RECEIVED:
        raise InvalidPlanError(
            f"{describe(model)} has no class token: score='cls' needs one; use score='received' (the default here)"
        )
    return requested
