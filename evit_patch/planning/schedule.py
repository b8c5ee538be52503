"""Searched schedules: where reduction starts and how fast it ramps in, chosen per model and budget.

Why a search and not a constant. A token's removal costs little once the model has sorted its
tokens out and much before that; where that happens is a property of the model (block 3 of 12 in
DeiT-Tiny, where removing 30 % of the tokens at one block costs 5x less KL than at block 2), and
how early reduction must start depends on the budget: the deeper the cut, the earlier it has to
begin so that no block loses too many tokens at once (measured best start on DeiT-Tiny: block 5 at
0.8x MACs, 3 at 0.65x, 2 at 0.45x, 0 at 0.35x). So the plan is taken from one family of schedules,
and the member is chosen by the model's own outputs:

- block ``l >= s`` keeps ``ceil(rho ** min(1, (l - s + 1) / R) * M_l)`` of its ``M_l`` image tokens:
  reduction starts at ``s`` and its rate ramps in over ``R`` blocks;
- ``rho`` fills the budget exactly (bisection on the analytic MACs);
- ``s`` in ``0..D/2`` and ``R`` in ``(1, 3)`` are chosen by the smallest distance to the original's
  outputs on probe images: synthetic dead leaves for ``apply`` (data-free, deterministic), the user's
  images for ``calibrate``;
- a dense model (``dense=True``) is read at every block, the last ones included, where a geometric
  schedule leaves the fewest tokens: its family also stops reducing after ``D/2`` or ``3D/4``
  blocks, and its distance is that of the restored last block (:mod:`.objective`).

Nothing here is fitted to one model: the family, the candidate grid and the probe are structural.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import Tensor, nn
from tqdm import tqdm

from ..config import EViTConfig, PlanOptions
from ..errors import InvalidPlanError
from ..families import Family
from ..options import Pool
from .budget import largest_keep
from .explain import CostModel
from .objective import Objective
from .probe import probe_images

RAMPS = (1, 3)
"""Blocks over which the keep rate ramps in: at once, or over three blocks."""


def stops(num_blocks: int, base: EViTConfig) -> tuple[int, ...]:
    """Where reduction ends (excluded): the last block (the last but one with ``cls_only``), and for a
    dense model also after ``D/2`` and ``3D/4`` blocks."""
    last = num_blocks - 1 if base.cls_only else num_blocks
    if not base.dense:
        return (last,)
    return tuple(sorted({last, *(max(1, round(num_blocks * f)) for f in (0.5, 0.75))}))


def ramp(start: int, length: int, rho: float, stop: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``(layers, keep)`` of the schedule starting at ``start``, ramping in over ``length`` blocks to
    the rate ``rho``, up to block ``stop`` (excluded)."""
    layers = tuple(range(start, stop))
    return layers, tuple(rho ** min(1.0, (layer - start + 1) / length) for layer in layers)


def candidates(
    cost: CostModel, base: EViTConfig, target_macs: float, starts: Sequence[int], ramps: Sequence[int] = RAMPS
) -> list[EViTConfig]:
    """Every schedule of the family that fills ``target_macs``, one per distinct token schedule."""
    found, seen = [], set()
    for stop, start, length in ((e, s, r) for e in stops(cost.num_blocks, base) for s in starts for r in ramps):
        if start >= stop:
            continue

        def plan(rho: float, start=start, length=length, stop=stop) -> EViTConfig:
            layers, keep = ramp(start, length, rho, stop)
            return base.replace(layers=layers, keep=keep)

        rho = largest_keep(lambda r, plan=plan: cost.macs(plan(r)), target_macs)
        if rho is None:
            continue
        config = plan(rho)
        tokens = tuple(row.tokens_out for row in cost.explain(config).rows)
        if tokens not in seen:
            seen.add(tokens)
            found.append(config)
    return found


def search(
    objective: Objective,
    cost: CostModel,
    base: EViTConfig,
    target_macs: float,
    *,
    where: str = "model",
    progress: bool = True,
) -> tuple[EViTConfig, list[tuple[float, EViTConfig]]]:
    """The candidate schedule closest to the original on the objective's images, and every candidate
    with its distance (ascending)."""
    starts = range(0, cost.num_blocks // 2 + 1)
    found = candidates(cost, base, target_macs, starts)
    if not found:
        raise InvalidPlanError(
            f"{where}: a budget of {target_macs / cost.macs_original:.3f}x of the original MACs is infeasible: "
            "keeping a single token from block 0 on still costs more"
        )
    scored = []
    for config in tqdm(found, desc="planning", disable=not progress, leave=False):
        scored.append((objective(config.layers, config.keep)[0], config))
    scored.sort(key=lambda item: item[0])
    return scored[0][1], scored


def reads_prefix_only(model: nn.Module, family: Family) -> bool:
    """Whether the model's output reads only its prefix (class) tokens: ``cls_only`` is exact for it."""
    return Pool(family.pool(model)) is Pool.TOKEN and not family.token_outputs(model)


def plan_searched(
    model: nn.Module,
    family: Family,
    cost: CostModel,
    target_macs: float,
    options: PlanOptions,
    *,
    images: Tensor | None = None,
    where: str = "model",
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[EViTConfig, Objective]:
    """The searched plan for ``model`` (unpatched) at ``target_macs``, compared on ``images`` (default:
    :func:`~evit_patch.planning.probe.probe_images`, dead leaves at the model's input size), with
    ``cls_only`` on where it is exact unless the options say otherwise; and the objective it was
    compared by (a copy patched at every block, for searches that go on from there)."""
    if options.cls_only is None:
        options = dataclasses.replace(options, cls_only=reads_prefix_only(model, family))
    if images is None:
        images = probe_images(model, family.input_size(model), family.in_chans(model))
    depth = cost.num_blocks
    every = EViTConfig.build(range(depth), 1.0, options, num_blocks=depth, where=where)
    objective = Objective(model, images, batch_size, every)
    best, _ = search(objective, cost, every, target_macs, where=where, progress=progress)
    return best, objective
