"""Budget -> plan: the keep rate that meets a FLOP (or ideal-speedup) budget, from token arithmetic.

MACs only grow with the keep rate (more tokens everywhere after the first reorganizing block),
so the largest keep within the budget is found by bisection on the analytic cost model: exact,
and with no forward pass.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence

from torch import nn

from ..config import EViTConfig, PlanOptions
from ..errors import InvalidPlanError
from ..families import describe, find_family
from ..options import Method
from .explain import CostModel


def default_layers(num_blocks: int, options: PlanOptions | None = None, *, budget: bool = False) -> tuple[int, ...]:
    """The method's reorganizing blocks when none are given (EViT: D/4, D/2, 3D/4, i.e. 3, 6, 9 of 12;
    merging under a budget: every block from D/4 on)."""
    return (options or PlanOptions()).reduction_class.default_layers(num_blocks, budget)


def target_fraction(flops: float | None, speedup: float | None, *, resized: bool = False) -> float:
    """The MAC fraction a ``flops`` or ``speedup`` budget asks for (speedup is FLOP-ideal); more than
    the original's MACs only for a plan at another input size (``resized``), where it can be met."""
    if (flops is None) == (speedup is None):
        raise InvalidPlanError("give exactly one budget: flops=<fraction of original MACs> or speedup=<factor>")
    value, name = (flops, "flops") if flops is not None else (speedup, "speedup")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidPlanError(f"{name} budget must be a positive number, got {value!r}")
    fraction = float(flops) if flops is not None else 1.0 / float(speedup)
    if fraction > 1.0 and not resized:
        bound = "at most 1" if name == "flops" else "at least 1"
        raise InvalidPlanError(
            f"{name} budget must be {bound} at the model's own input size, got {value!r}: a plan costs at most "
            "the original's MACs (keep 1.0 everywhere saves nothing); with img_size= a budget is relative to the "
            "native size and may exceed it"
        )
    return fraction


def largest_keep(macs: Callable[[float], int], target_macs: float) -> float | None:
    """Largest keep in (0, 1] with ``macs(keep) <= target_macs`` (``macs`` non-decreasing), or ``None``."""
    if macs(1.0) <= target_macs:
        return 1.0
    low, high = 1e-6, 1.0
    if macs(low) > target_macs:
        return None
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if macs(middle) <= target_macs else (low, middle)
    rounded = math.floor(low * 1e4) / 1e4  # a readable rate with the same token counts (or fewer)
    return rounded if rounded > 0 and macs(rounded) <= target_macs else low


def max_keep_within(
    cost: CostModel, base: EViTConfig, keeps: Sequence[float], index: int, target_macs: float
) -> float | None:
    """The largest keep for ``base.layers[index]``, the other ``keeps`` fixed, within ``target_macs``
    (``None``: none); ``base`` gives the layers and the other options."""

    def macs(k: float) -> int:
        trial = list(keeps)
        trial[index] = k
        return cost.macs(base.replace(keep=tuple(trial)))

    return largest_keep(macs, target_macs)


def plan_for_budget(
    cost: CostModel,
    *,
    target_macs: float,
    layers: Sequence[int] | None = None,
    options: PlanOptions | None = None,
    where: str = "model",
) -> EViTConfig:
    """One keep rate for every layer in ``layers``, as large as ``target_macs`` allows."""
    options = options or PlanOptions()
    if options.cls_only is None:
        options = dataclasses.replace(options, cls_only=False)
    layers = tuple(layers) if layers is not None else default_layers(cost.num_blocks, options, budget=True)
    base = EViTConfig.build(layers, 1.0, options, num_blocks=cost.num_blocks, where=where)  # validates
    layers = base.layers

    def uniform(k: float) -> EViTConfig:
        return base.replace(keep=(k,) * len(layers))

    original = cost.explain(base).macs_original
    lowest = cost.macs(uniform(1e-6))
    if lowest > target_macs:
        raise InvalidPlanError(
            f"{where}: a budget of {target_macs / 1e9:.3f} GMACs ({target_macs / original:.3f}x of "
            f"{original / 1e9:.3f}) is infeasible at layers {list(layers)}: keeping a single token there "
            f"still costs {lowest / 1e9:.3f} GMACs ({lowest / original:.3f}x); reorganize at earlier or more layers"
        )
    config = uniform(largest_keep(lambda k: cost.macs(uniform(k)), target_macs))
    warn_if_few_tokens(cost, config, where)
    return config


FEW_IMAGE_TOKENS = 4
"""A budget plan keeping fewer image tokens than this at some block is warned about. On the genuine
DeiT-Tiny (75 validation images), plans keeping 1-2 image tokens agree with the original on 4-60 % of
the images (speedup 2.5-3), those keeping 6-7 on 45-71 %: below a 2x2 patch neighbourhood the
prediction has next to nothing left to stand on, whatever the method."""


def fewest_kept(cost: CostModel, config: EViTConfig) -> tuple[int, int]:
    """``(image tokens, block)``: the fewest image tokens a block of ``config`` keeps (a fused token
    not counted), and the first block keeping that few."""
    prefix, extra = cost.profile.num_prefix_tokens, config.plan_options.reduction(cost.profile.pool).extra_tokens
    rows = cost.explain(config).rows
    rows = rows[:-1] if config.cls_only else rows  # a class-token head's last block keeps none by design
    kept = [(row.tokens_out - prefix - (extra if row.tokens_out < row.tokens_in else 0), row.index) for row in rows]
    return min(kept, key=lambda pair: pair[0])


def warn_if_few_tokens(cost: CostModel, config: EViTConfig, where: str) -> None:
    """One warning, with the numbers, when a budget plan keeps fewer than :data:`FEW_IMAGE_TOKENS` image tokens."""
    count, block = fewest_kept(cost, config)
    if count < FEW_IMAGE_TOKENS:
        explanation = cost.explain(config)
        warnings.warn(
            f"{where}: the plan for this budget ({explanation.macs_patched / explanation.macs_original:.3f}x MACs, "
            f"keep {config.keep[0]:.4g} at layers {list(config.layers)}) keeps {count} image token(s) from block "
            f"{block} on, of {cost.tokens - cost.profile.num_prefix_tokens}: with fewer than {FEW_IMAGE_TOKENS} "
            "the predictions have little left of the original's; ask for a smaller budget cut, or fine-tune",
            UserWarning,
            stacklevel=4,
        )


def plan(
    model: nn.Module,
    *,
    flops: float | None = None,
    speedup: float | None = None,
    layers: Sequence[int] | None = None,
    img_size: int | tuple[int, int] | None = None,
    fuse: bool = True,
    score: str | None = None,
    method: str | Method = Method.EVIT,
    proportional: bool | None = None,
    cls_only: bool | None = None,
    dense: bool | None = None,
    progress: bool = True,
) -> EViTConfig:
    """The EViT configuration that meets a budget relative to ``model`` at its own input size.

    Args:
        model: an original (or patched) supported model.
        flops: fraction of the original MACs, e.g. ``0.66``.
        speedup: FLOP-ideal speedup, e.g. ``1.5`` (same as ``flops=1/1.5``).
        layers: reorganizing blocks; default D/4, D/2, 3D/4 (3, 6, 9 for 12 blocks).
        img_size: plan for inputs of this size (the budget stays relative to the native size):
            ``img_size=272, flops=1.0`` is EViT's same-cost higher resolution.
        score: as for :func:`~evit_patch.apply`; the received-attention score costs more MACs.
        method: as for :func:`~evit_patch.apply`; ``"merge"`` defaults to every block from D/4 on.
        proportional: as for :func:`~evit_patch.apply`.
        cls_only: as for :func:`~evit_patch.apply`.
        dense: as for :func:`~evit_patch.apply`.
        progress: as for :func:`~evit_patch.apply`.

    Raises:
        InvalidPlanError: the budget is malformed or infeasible at these layers (the message
            gives the least cost the layers allow).
    """
    where = describe(model)
    options = PlanOptions.build(
        method=method, fuse=fuse, score=score, proportional=proportional, cls_only=cls_only, dense=dense, where=where
    )
    fraction = target_fraction(flops, speedup, resized=img_size is not None)
    native = CostModel.of(model)
    family = find_family(model)
    options = options.resolve_dense(family.feature_maps(model), where)
    resized = model if img_size is None else family.resized(model, img_size)
    cost = native if img_size is None else CostModel.of(resized, img_size)
    target = fraction * native.macs_original
    if layers is None and options.reduction_class.searches_schedule:
        from .schedule import plan_searched  # the search patches candidate models (schedule -> pipeline)

        return plan_searched(resized, family, cost, target, options, where=where, progress=progress)[0]
    return plan_for_budget(cost, target_macs=target, layers=layers, options=options, where=where)
