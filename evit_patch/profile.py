"""Trace and locate every block of a model: the facts the rewrite and ``explain`` share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .cost import BlockCost
from .families import Family, describe
from .locate import BlockSite, locate
from .trace import trace_block


@dataclass(frozen=True)
class TracedBlock:
    """A block's graph and what the locator found in it."""

    name: str
    graph_module: fx.GraphModule
    site: BlockSite


@dataclass(frozen=True)
class ModelProfile:
    """Static facts about a (patched or original) model; attached to patched models."""

    family: str
    model: str
    num_prefix_tokens: int
    block_names: tuple[str, ...]
    costs: tuple[BlockCost, ...]


def trace_blocks(model: nn.Module, family: Family) -> list[TracedBlock]:
    """Trace every block of ``model`` (pass a copy: its blocks become graph roots)."""
    who = describe(model)
    prefix = family.num_prefix_tokens(model)
    channels = family.channels(model)
    traced = []
    for name, block in family.blocks(model):
        where = f"{who}.{name}"
        gm = trace_block(block, where=where, leaf_types=family.leaf_types())
        _propagate_shapes(gm, block, tokens=prefix + 4, channels=channels)
        site = locate(gm, where=where, channels=channels, num_prefix_tokens=prefix)
        traced.append(TracedBlock(name, gm, site))
    return traced


def _propagate_shapes(gm: fx.GraphModule, block: nn.Module, *, tokens: int, channels: int) -> None:
    param = next(block.parameters(), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, tokens, channels, device=device, dtype=dtype))
    finally:
        gm.train(was_training)


def profile_of(traced: list[TracedBlock], model: nn.Module, family: Family) -> ModelProfile:
    return ModelProfile(
        family=family.name,
        model=describe(model),
        num_prefix_tokens=family.num_prefix_tokens(model),
        block_names=tuple(t.name for t in traced),
        costs=tuple(t.site.cost for t in traced),
    )
