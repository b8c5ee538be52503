"""Calibrated planning: search layers and per-layer keep rates under a FLOP budget to stay closest
to the original model's predictions on a few unlabelled images.

One copy of the model is patched at every block; a candidate plan is just a keep rate per block
(1.0 where it does not reorganize), set with ``set_keep``: nothing is re-traced during the search.
Every candidate fills the budget exactly as far as the token arithmetic allows, so plans compete
on accuracy at equal cost. The search is a deterministic hill climb: move one layer by one block,
or shift keep between two layers, take the best move, halve the step when none helps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..config import EViTConfig, PlanOptions
from ..errors import UnsupportedInputError
from ..families import describe, find_family
from ..options import Method, Score
from .budget import max_keep_within, plan_for_budget, target_fraction
from .explain import CostModel
from .objective import Objective
from .schedule import plan_searched


@dataclass(frozen=True)
class CalibrationResult:
    """The plan :func:`calibrate` found; apply it with ``evit_patch.apply(model, **result.apply_kwargs())``."""

    config: EViTConfig
    kl: float
    """Mean KL(original || patched) on the calibration images, in nats (embedding models: 1 - cosine)."""
    agreement: float
    baseline: EViTConfig
    """The analytic plan the search started from (uniform keep at the default layers)."""
    baseline_kl: float
    baseline_agreement: float
    evaluations: int

    def apply_kwargs(self) -> dict:
        """The calibrated plan as keyword arguments of :func:`evit_patch.apply`: ``layers``, ``keep`` and
        the plan options (method, fuse, score, proportional)."""
        return {"layers": self.config.layers, "keep": self.config.keep, **self.config.options()}


def _moves(state, cost: CostModel, target: float, base: EViTConfig, step: float):
    """Neighbouring plans that fill the budget: shift a layer, or move keep between two layers."""
    layers, keeps = state
    for i in range(len(layers)):
        for delta in (-1, 1):
            moved = list(layers)
            moved[i] += delta
            if not 0 <= moved[i] < cost.num_blocks or moved[i] in layers:
                continue
            order = sorted(range(len(moved)), key=moved.__getitem__)
            new_layers = tuple(moved[o] for o in order)
            new_keeps = [keeps[o] for o in order]
            filled = max_keep_within(
                cost, base.replace(layers=new_layers), new_keeps, new_layers.index(moved[i]), target
            )
            if filled is not None:
                new_keeps[new_layers.index(moved[i])] = filled
                yield new_layers, tuple(new_keeps)
    for i in range(len(layers)):
        for j in range(len(layers)):
            for sign in (1, -1):
                if i == j or not 0 < keeps[i] + sign * step <= 1:
                    continue
                new_keeps = list(keeps)
                new_keeps[i] = round(keeps[i] + sign * step, 6)
                filled = max_keep_within(cost, base.replace(layers=layers), new_keeps, j, target)
                if filled is not None:
                    new_keeps[j] = filled
                    yield layers, tuple(new_keeps)


def check_images(images: object, model: nn.Module, where: str) -> None:
    """Refuse what the model cannot take as preprocessed images, naming what was found and what is expected."""
    param = next(model.parameters())
    preprocessing = (
        "preprocess them as the model expects, e.g. timm.data.create_transform(**timm.data.resolve_data_config("
        "{}, model=model)): float, scaled to [0, 1] and normalized by the model's mean and std"
    )
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        found = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise UnsupportedInputError(
            f"calibrate: {where} needs a (N, C, H, W) batch of images, got {found}; {preprocessing}"
        )
    if not images.is_floating_point():
        raise UnsupportedInputError(
            f"calibrate: images are {images.dtype}; {where} takes {param.dtype} images: {preprocessing}, "
            f"then .to({param.dtype})"
        )


def calibrate(
    model: nn.Module,
    images: torch.Tensor,
    *,
    flops: float | None = None,
    speedup: float | None = None,
    layers: tuple[int, ...] | None = None,
    fuse: bool = True,
    score: str | Score | None = None,
    method: str | Method = Method.EVIT,
    proportional: bool | None = None,
    cls_only: bool | None = None,
    dense: bool | None = None,
    batch_size: int = 64,
    step: float = 0.1,
    min_step: float = 0.025,
    max_evaluations: int = 200,
    progress: bool = True,
) -> CalibrationResult:
    """Search for the plan within the budget whose predictions stay closest to ``model``'s.

    Args:
        model: the original model (left untouched).
        images: a few unlabelled images, preprocessed as for the model (float, normalized), e.g. 64-256.
        flops: the budget as a fraction of the original MACs, as in :func:`evit_patch.plan`.
        speedup: or as a FLOP-ideal speedup.
        layers: the starting layer set (default as for :func:`~evit_patch.plan`); the search may move them.
        fuse: as for :func:`~evit_patch.apply`; the search keeps it, as it keeps the next three.
        score: as for :func:`~evit_patch.apply`.
        method: as for :func:`~evit_patch.apply`.
        proportional: as for :func:`~evit_patch.apply`.
        cls_only: as for :func:`~evit_patch.apply`.
        dense: as for :func:`~evit_patch.apply`.
        step: the first keep-rate step; halved when no move helps, down to ``min_step``.
        max_evaluations: cap on distinct plans evaluated.

    Raises:
        UnsupportedInputError: ``images`` are not a float ``(N, C, H, W)`` batch (raw ``uint8`` pixels, say).
        InvalidPlanError: the budget is malformed or infeasible, as for :func:`~evit_patch.plan`.
    """
    # One trace: a copy patched at every block (keep 1.0) serves the cost model and the search.
    where = describe(model)
    check_images(images, model, where)
    options = PlanOptions.build(
        method=method, fuse=fuse, score=score, proportional=proportional, cls_only=cls_only, dense=dense, where=where
    )
    family = find_family(model)
    options = options.resolve_dense(family.feature_maps(model), where)
    fraction = target_fraction(flops, speedup)
    if layers is None and options.reduction_class.searches_schedule:
        # The searched schedule, chosen on these images rather than synthetic ones, is where the climb starts.
        cost = CostModel.of(model)
        target = fraction * cost.macs_original
        start, objective = plan_searched(
            model, family, cost, target, options, images=images, where=where, batch_size=batch_size, progress=progress
        )
    else:
        depth = len(family.blocks(model))
        every = EViTConfig.build(range(depth), 1.0, options, num_blocks=depth, where=where)
        objective = Objective(model, images, batch_size, every)
        cost = CostModel.of(objective.patched)
        target = fraction * cost.macs_original
        start = plan_for_budget(cost, target_macs=target, layers=layers, options=options, where=where)
    state = (start.layers, start.keep)
    best = objective(*state)
    baseline = best
    bar = tqdm(total=max_evaluations, desc="calibrating", disable=not progress)
    while len(objective.cache) < max_evaluations:
        candidates = []
        for move in _moves(state, cost, target, start, step):
            if len(objective.cache) >= max_evaluations:
                break
            seen = move in objective.cache
            candidates.append((objective(*move), move))
            bar.update(0 if seen else 1)
        better = [c for c in candidates if c[0][0] < best[0] - 1e-9]
        if better:
            best, state = min(better, key=lambda c: c[0][0])
            bar.set_postfix(kl=f"{best[0]:.4f}", agreement=f"{best[1]:.3f}")
        elif step / 2 >= min_step:
            step /= 2
        else:
            break
    bar.close()
    config = start.replace(layers=state[0], keep=state[1])
    return CalibrationResult(config, best[0], best[1], start, baseline[0], baseline[1], len(objective.cache))
