"""Trace and locate every block of a model: the facts the rewrite and ``explain`` share."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..errors import UnsupportedModelError
from ..families import Family, describe, find_family
from ..families.discovered import DiscoveredFamily
from ..options import Pool, Score
from .cost import BlockCost, block_cost
from .locate import BlockSite, locate
from .trace import trace_block

PROFILE_ATTR = "evit_profile"
"""Attribute holding the :class:`ModelProfile` of a patched model."""


@dataclass(frozen=True)
class TracedBlock:
    """A block's graph and what the locator found in it."""

    name: str
    graph_module: fx.GraphModule
    site: BlockSite
    cost: BlockCost
    reexpressed: bool = False
    """The family traced a re-expression of the block (``prepare_block``): equal up to rounding only."""


@dataclass(frozen=True)
class ModelProfile:
    """Static facts about a (patched or original) model; attached to patched models."""

    family: str
    model: str
    num_prefix_tokens: int
    block_names: tuple[str, ...]
    costs: tuple[BlockCost, ...]
    score: Score = Score.CLS
    """The family's default score for this model (a patched model's own score is in its config)."""
    pool_macs_per_token: int = 0
    """MACs an attention-pool head spends per token it reads (0 for other heads)."""
    pool_prefix_tokens: int = 0
    """Prefix tokens the attention pool reads besides the image tokens."""
    pool: Pool = Pool.TOKEN
    """How the head reads the last block's tokens (it configures the reduction, e.g. EViT's fused
    token on the tokens' scale for pooling heads)."""
    discovered: str = ""
    """What structural discovery found, when no registered family claims the model."""

    def pool_macs(self, tokens: int) -> int:
        """The head's token-dependent MACs when ``tokens`` (prefix included) leave the last block."""
        return self.pool_macs_per_token * (tokens - self.num_prefix_tokens + self.pool_prefix_tokens)


def trace_blocks(model: nn.Module, family: Family, mode: FakeTensorMode | None = None) -> list[TracedBlock]:
    """Trace every block of ``model`` (pass a copy: its blocks become graph roots, and the family
    may restructure it first, see :meth:`Family.prepare_copy`).

    ``mode``: the fake-tensor mode to propagate shapes in; sharing one with :mod:`.verify` fakes
    each parameter once per ``apply`` (faking them dominates the cost of both steps).
    """
    mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
    family.prepare_copy(model)
    who = describe(model)
    prefix = family.num_prefix_tokens(model)
    channels = family.channels(model)
    tokens = family.num_tokens(model)
    live = family.live_args(model)
    traced = []
    propagated: dict[tuple, fx.GraphModule] = {}
    for index, (name, block) in enumerate(family.blocks(model)):
        where = f"{who}.{name}"
        prepared = family.prepare_block(block)
        gm = trace_block(prepared, where=where, leaf_types=family.leaf_types(), live=live)
        site = locate(gm, where=where)
        inputs = [family.block_inputs(model, index)[arg] for arg in live]
        key = _signature(gm, inputs, where)
        if key in propagated:  # a block like one already run: the same shapes, without faking it again
            for node, seen in zip(gm.graph.nodes, propagated[key].graph.nodes):
                if "val" in seen.meta:
                    node.meta["val"] = seen.meta["val"]
        else:
            _propagate_shapes(gm, block, inputs, mode, where=where, tokens=tokens, channels=channels)
            propagated[key] = gm
        cost = block_cost(site, channels=channels, num_prefix_tokens=prefix)
        traced.append(TracedBlock(name, gm, site, cost, reexpressed=prepared is not block))
    return traced


_PLAIN = (int, float, bool, str, type(None))


def _signature(gm: fx.GraphModule, inputs: list[torch.Tensor], where: str) -> tuple:
    """What a block's propagated shapes depend on: its graph code (with its own name, which only its
    messages hold, taken out), every submodule's type and public plain settings (a leaf's head count
    shapes its output without showing in its weights), every parameter and buffer's shape and dtype,
    and the inputs'. Blocks that agree on all of it (the repeated blocks of a ViT) propagate to the
    same shapes, so only the first is run on fake tensors."""

    def plain(value) -> bool:
        return isinstance(value, _PLAIN) or isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)

    modules = tuple(
        (name, type(m).__qualname__, tuple(sorted((k, v) for k, v in vars(m).items() if k[0] != "_" and plain(v))))
        for name, m in gm.named_modules()
    )
    tensors = tuple((n, t.shape, t.dtype, t.device) for n, t in (*gm.named_parameters(), *gm.named_buffers()))
    nodes = tuple(n.name for n in gm.graph.nodes)
    return (gm.code.replace(where, "<block>"), nodes, modules, tensors, tuple((t.shape, t.dtype) for t in inputs))


def _propagate_shapes(
    gm: fx.GraphModule,
    block: nn.Module,
    inputs: list[torch.Tensor],
    mode: FakeTensorMode,
    *,
    where: str,
    tokens: int,
    channels: int,
) -> None:
    """Annotate node shapes (``node.meta["val"]``) by running the block on fake tensors of the
    model's token count: shapes and dtypes only, no arithmetic."""
    param = next(block.parameters(), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            x = mode.from_tensor(torch.empty(1, tokens, channels, device=device, dtype=dtype))
            FakeTensorProp(gm, mode).propagate(x, *(mode.from_tensor(t) for t in inputs))
    except Exception as exc:
        raise UnsupportedModelError(
            f"{where}: running the traced block on (1, {tokens}, {channels}) tokens failed: {exc}"
        ) from exc
    finally:
        gm.train(was_training)


def profile_of(traced: list[TracedBlock], model: nn.Module, family: Family) -> ModelProfile:
    return ModelProfile(
        family=family.name,
        model=describe(model),
        num_prefix_tokens=family.num_prefix_tokens(model),
        block_names=tuple(t.name for t in traced),
        costs=tuple(t.cost for t in traced),
        score=family.score(model),
        pool_macs_per_token=family.pool_macs_per_token(model),
        pool_prefix_tokens=family.pool_prefix_tokens(model),
        pool=Pool(family.pool(model)),
        discovered=family.structure.summary() if isinstance(family, DiscoveredFamily) else "",
    )


def profile_model(model: nn.Module) -> ModelProfile:
    """The profile attached to a patched model, or one traced from a copy of an original model."""
    attached = getattr(model, PROFILE_ATTR, None)
    if isinstance(attached, ModelProfile):
        return attached
    family = find_family(model)
    family.check(model)
    return profile_of(trace_blocks(copy.deepcopy(model), family), model, family)
