"""Insert EViT's modules at located sites: the only place graphs are edited."""

from __future__ import annotations

import operator
from functools import partial

import torch.fx as fx
from torch import nn

from .errors import UnsupportedModelError
from .locate import BlockSite, tokens_input
from .reorganizer import TokenReorganizer
from .token_track import PositionGather, SizeWeightedTokens, TokenTrack, TrackStart
from .trace import BlockTracer

REORGANIZER_NAME = "evit"
"""Submodule name of the inserted module inside a patched block (``blocks.3.evit``)."""


def insert_reorganizer(
    gm: fx.GraphModule, site: BlockSite, reorganizer: TokenReorganizer, bias: fx.Node | None = None
) -> fx.GraphModule:
    """Route the residual stream through ``reorganizer`` between attention and MLP.

    Requires: ``site`` was located in ``gm``; ``bias`` is the position bias as the attention now
    reads it (see :func:`insert_position_gathers`). Ensures: every former user of the attention
    residual add (the MLP's norm, the second residual add) reads the reorganized tokens.
    """
    gm.add_submodule(REORGANIZER_NAME, reorganizer)
    graph = gm.graph
    extra = (bias,) if bias is not None and len(site.score_inputs) == 2 else ()
    with graph.inserting_after(site.residual_add):
        node = graph.call_module(REORGANIZER_NAME, (site.residual_add, *site.score_inputs, *extra))
    site.residual_add.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    graph.lint()
    gm.recompile()
    return gm


def insert_position_gathers(
    gm: fx.GraphModule, site: BlockSite, track: TokenTrack, rotary_args: tuple[str, ...], *, first: bool
) -> fx.Node | None:
    """Make the block's position-dependent inputs follow the tracked tokens.

    The position bias and every rotary-table argument are re-indexed by ``track`` before the
    attention reads them; the ``first`` block starts a new track. Returns the bias node the
    attention now reads (``None`` without a bias).
    """
    graph = gm.graph
    tokens = tokens_input(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1]
    if first:
        gm.add_submodule("evit_start", TrackStart(track))
        with graph.inserting_after(anchor):
            started = graph.call_module("evit_start", (tokens,))
        tokens.replace_all_uses_with(started, delete_user_cb=lambda user: user is not started)
        tokens = anchor = started
    for name in rotary_args:
        table = next(n for n in placeholders if n.target == name)
        gm.add_submodule(f"evit_{name}", PositionGather(track, "rope", site.where))
        with graph.inserting_after(anchor):
            anchor = graph.call_module(f"evit_{name}", (table, tokens))
        table.replace_all_uses_with(anchor, delete_user_cb=partial(operator.is_not, anchor))
    bias = site.bias
    if bias is not None:
        gm.add_submodule("evit_bias", PositionGather(track, "bias", site.where))
        with graph.inserting_after(bias if bias not in placeholders else anchor):
            gathered = graph.call_module("evit_bias", (bias, tokens))
        site.bias_user.replace_input_with(bias, gathered)
        bias = gathered
    graph.lint()
    gm.recompile()
    return bias


def with_size_weights(norm: nn.Module, track: TokenTrack, weighted: bool, *, where: str) -> fx.GraphModule:
    """``norm`` followed by :class:`SizeWeightedTokens`, keeping ``norm``'s parameter names."""
    try:
        graph = BlockTracer().trace(norm)
    except Exception as exc:  # fx raises many types; the cause is chained for the details
        raise UnsupportedModelError(
            f"{where}: torch.fx could not trace the final norm ({type(norm).__name__}), where the "
            f"average pool's size weights go: {exc}"
        ) from exc
    gm = fx.GraphModule(norm, graph, class_name=type(norm).__name__)
    gm.add_submodule("evit_pool", SizeWeightedTokens(track, weighted, where))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        pooled = gm.graph.call_module("evit_pool", (output.args[0],))
    output.args = (pooled,)
    gm.graph.lint()
    gm.recompile()
    gm.train(norm.training)
    return gm
