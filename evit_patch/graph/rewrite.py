"""Insert EViT's modules at located sites, as :mod:`.wiring` decided: the only place graphs are edited."""

from __future__ import annotations

import operator
from functools import partial

import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError
from ..families import Family, describe
from ..opaque import runtime_guard
from ..options import Pool
from ..token_state import AttentionBias, Pack, PoolSizeBias, PrefixTokens, RopeGather, SizeWeightedTokens, Unpack
from .locate import BlockSite, locate_pool, tokens_input
from .profile import TracedBlock
from .reorganizer import ScoreSource
from .trace import BlockTracer, trace_block
from .wiring import BlockEdit, Wiring

REORGANIZER_NAME = "evit"
"""Submodule name of the inserted module inside a patched block (``blocks.3.evit``)."""


def insert(patched: nn.Module, family: Family, traced: list[TracedBlock], wiring: Wiring) -> None:
    """Edit ``patched`` (a copy) as ``wiring`` says: its blocks, its final norm, its attention pool."""
    for block, edit in zip(traced, wiring.blocks):
        if edit.changes_graph:
            rewrite_block(block.graph_module, block.site, edit)
        if edit.changes_graph or edit.sees_reduced:
            patched.set_submodule(block.name, block.graph_module)
    attention_pool = wiring.pool_module is not None
    if wiring.final_norm is not None:
        where = f"{describe(patched)}.{wiring.final_norm}"
        norm = patched.get_submodule(wiring.final_norm)
        wrapped = wrap_final_norm(
            norm, wiring.final_edit, wiring.pool is Pool.AVG, where=where, pass_state=attention_pool
        )
        patched.set_submodule(wiring.final_norm, wrapped)
    if attention_pool:
        where = f"{describe(patched)}.{wiring.pool_module}"
        pool = patched.get_submodule(wiring.pool_module)
        wrapped = wrap_attention_pool(pool, wiring.pool_edit, where=where, leaf_types=family.leaf_types())
        patched.set_submodule(wiring.pool_module, wrapped)
        family.confine_state(patched)


def rewrite_block(gm: fx.GraphModule, site: BlockSite, edit: BlockEdit) -> fx.GraphModule:
    """Make one traced block follow reorganized tokens and/or reorganize them.

    Requires: ``site`` was located in ``gm``. Ensures: with ``state_in``, the tokens' state is split
    off the input and the position bias, rotary tables and (``proportional``) size bias follow it;
    every former user of the attention residual add (the MLP's norm, the second residual add)
    reads the reorganized tokens; with ``weigh_out``, the output's image tokens are scaled by their
    sizes for the mean the head takes; with ``state_out``, the output carries the new state.
    """
    graph = gm.graph
    positions = sizes = owner = None
    if edit.state_in:
        positions, sizes, owner = _unpack_input(gm, edit)
        _follow_tables(gm, site, edit, positions)
    bias = _attention_bias(gm, site, edit, positions, sizes) if edit.state_in else site.bias
    if edit.reorganizer is not None:
        gm.add_submodule(REORGANIZER_NAME, edit.reorganizer)
        kwargs = {"bias": bias} if bias is not None and site.source is ScoreSource.QUERY_KEY else {}
        if site.keys is not None and site.source is ScoreSource.PROBABILITIES:
            kwargs["keys"] = site.keys
        if edit.reorganizer.stateful:
            kwargs.update(positions=positions, sizes=sizes)
        if edit.reorganizer.dense:
            kwargs.update(owner=owner)
        with graph.inserting_after(site.residual_add):
            node = graph.call_module(REORGANIZER_NAME, (site.residual_add, *site.score_inputs), kwargs)
        tokens = node
        if edit.reorganizer.stateful:
            count = 4 if edit.reorganizer.dense else 3
            with graph.inserting_after(node):
                tokens, positions, sizes, *rest = (
                    graph.call_function(operator.getitem, (node, i)) for i in range(count)
                )
            owner = rest[0] if rest else owner
        site.residual_add.replace_all_uses_with(tokens, delete_user_cb=lambda user: user is not node)
    if edit.prefix_only:
        positions, sizes = _prefix_only(gm, site, edit, positions, sizes)
    if edit.weigh_out:
        gm.add_submodule("evit_pool", SizeWeightedTokens())
        output = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(output):
            weighed = graph.call_module("evit_pool", (output.args[0], sizes, edit.num_prefix_tokens))
        output.args = (weighed,)
    if edit.state_out:
        gm.add_submodule("evit_pack", Pack(edit.num_prefix_tokens))
        output = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(output):
            state = (positions, sizes) if owner is None else (positions, sizes, owner)
            packed = graph.call_module("evit_pack", (output.args[0], *state))
        output.args = (packed,)
    for name, module in gm.named_children():  # what was inserted follows the block's mode (eval stays eval)
        if name.startswith(REORGANIZER_NAME):
            module.train(gm.training)
    graph.lint()
    gm.recompile()
    return gm


def _prefix_only(
    gm: fx.GraphModule, site: BlockSite, edit: BlockEdit, positions: fx.Node | None, sizes: fx.Node | None
) -> tuple[fx.Node, fx.Node]:
    """After attention (and any reorganization), only the prefix tokens go on to the MLP."""
    graph = gm.graph
    reorganizer = next((n for n in graph.nodes if n.op == "call_module" and n.target == REORGANIZER_NAME), None)
    tokens = site.residual_add
    if reorganizer is not None:
        tokens = next((u for u in reorganizer.users if u.target is operator.getitem and u.args[1] == 0), reorganizer)
    gm.add_submodule("evit_prefix", PrefixTokens(edit.num_prefix_tokens))
    with graph.inserting_after(tokens):
        node = graph.call_module("evit_prefix", (tokens, positions, sizes))
    with graph.inserting_after(node):
        kept, positions, sizes = (graph.call_function(operator.getitem, (node, i)) for i in range(3))
    keep = {node, reorganizer}
    tokens.replace_all_uses_with(kept, delete_user_cb=lambda user: user not in keep and user is not kept)
    return positions, sizes


def _unpack_input(gm: fx.GraphModule, edit: BlockEdit) -> tuple[fx.Node, fx.Node, fx.Node]:
    """Split the state off the block's token input: ``(positions, sizes, owner)`` nodes."""
    graph = gm.graph
    tokens = tokens_input(graph)
    gm.add_submodule("evit_unpack", Unpack(edit.channels, edit.num_prefix_tokens, edit.num_patches))
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(anchor):
        unpacked = graph.call_module("evit_unpack", (tokens,))
    count = 3 if edit.num_patches is None else 4
    with graph.inserting_after(unpacked):
        x, positions, sizes, *owner = (graph.call_function(operator.getitem, (unpacked, i)) for i in range(count))
    tokens.replace_all_uses_with(x, delete_user_cb=lambda user: user is not unpacked)
    return positions, sizes, owner[0] if owner else None


def _follow_tables(gm: fx.GraphModule, site: BlockSite, edit: BlockEdit, positions: fx.Node) -> None:
    """Re-index every rotary-table argument by the tokens' original positions."""
    graph = gm.graph
    for name in edit.rotary_args:
        table = next(n for n in graph.nodes if n.op == "placeholder" and n.target == name)
        gm.add_submodule(f"evit_{name}", RopeGather())
        with graph.inserting_after(positions):
            gathered = graph.call_module(f"evit_{name}", (table, positions))
        table.replace_all_uses_with(gathered, delete_user_cb=partial(operator.is_not, gathered))


def _attention_bias(
    gm: fx.GraphModule, site: BlockSite, edit: BlockEdit, positions: fx.Node, sizes: fx.Node
) -> fx.Node | None:
    """The attention mask for the current tokens: the position bias re-indexed, plus ``log(size)``.
    Returns the node the attention now reads (``None``: no bias, none needed)."""
    if site.bias is None and not edit.proportional:
        return None
    graph = gm.graph
    gm.add_submodule("evit_bias", AttentionBias(edit.num_prefix_tokens, edit.proportional))
    op = site.attention
    if site.source is ScoreSource.QUERY_KEY:
        like = site.score_inputs[0]  # q: the mask takes its dtype
    elif site.bias is not None:
        like = next(a for a in site.bias_user.args[:2] if a is not site.bias)  # the logits it is added to
    else:
        like = op.args[0]
    order = {n: i for i, n in enumerate(graph.nodes)}
    anchor = max((n for n in (site.bias, sizes, like) if n is not None), key=order.__getitem__)
    with graph.inserting_after(anchor):
        bias = graph.call_module("evit_bias", (site.bias, positions, sizes, like))
    if site.bias is not None:
        site.bias_user.replace_input_with(site.bias, bias)
    elif site.source is ScoreSource.QUERY_KEY:
        if len(op.args) > 3:
            op.update_arg(3, bias)
        else:
            op.update_kwarg("attn_mask", bias)
    else:
        with graph.inserting_after(bias):
            logits = graph.call_function(_add_bias, (op.args[0], bias))
        op.update_arg(0, logits)
    return bias


@runtime_guard
@fx.wrap
def _add_bias(logits, bias):
    """``logits + bias``; ``None`` adds nothing (no token has moved yet)."""
    return logits if bias is None else logits + bias


def wrap_final_norm(
    norm: nn.Module, edit: BlockEdit, weighted: bool, *, where: str, pass_state: bool = False
) -> fx.GraphModule:
    """``norm`` on the tokens with their state split off, followed by size weights for an average
    pool (``weighted``), or by the state appended again for an attention pool that reads the sizes
    itself (``pass_state``, see :func:`wrap_attention_pool`); keeps ``norm``'s parameter names."""
    try:
        graph = BlockTracer().trace(norm)
    except Exception as exc:  # fx raises many types; the cause is chained for the details
        raise UnsupportedModelError(
            f"{where}: torch.fx could not trace the final norm ({type(norm).__name__}), where the "
            f"tokens' positions and sizes are split off: {exc}"
        ) from exc
    gm = fx.GraphModule(norm, graph, class_name=type(norm).__name__)
    positions, sizes, _ = _unpack_input(gm, edit)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if weighted:
        gm.add_submodule("evit_pool", SizeWeightedTokens())
        with gm.graph.inserting_before(output):
            pooled = gm.graph.call_module("evit_pool", (output.args[0], sizes, edit.num_prefix_tokens))
        output.args = (pooled,)
    elif pass_state:
        gm.add_submodule("evit_pack", Pack(edit.num_prefix_tokens))
        with gm.graph.inserting_before(output):
            packed = gm.graph.call_module("evit_pack", (output.args[0], positions, sizes))
        output.args = (packed,)
    gm.graph.lint()
    gm.recompile()
    gm.train(norm.training)
    return gm


def wrap_attention_pool(
    pool: nn.Module, edit: BlockEdit, *, where: str, leaf_types: tuple[type[nn.Module], ...] = ()
) -> fx.GraphModule:
    """An attention-pool head (a probe attends over the tokens) that reads the tokens with their
    state: the sizes are split off and ``log(size)`` is added to each key's logit in the probe's
    softmax (:class:`~evit_patch.token_state.PoolSizeBias`), so a fused or merged token weighs as
    the tokens it stands for. ``edit.num_prefix_tokens``: the rows before the image tokens that
    ``pool`` reads. While no token has moved, the head runs exactly as before. Any library's head
    whose attention is one SDPA call, one softmax or one ``nn.MultiheadAttention`` is served;
    parameter names stay ``pool``'s."""
    gm = trace_block(pool, where=where, leaf_types=leaf_types)
    site = locate_pool(gm, where=where)
    _, sizes, _ = _unpack_input(gm, edit)
    graph, op = gm.graph, site.attention
    heads = None if site.multihead is None else site.multihead.num_heads
    gm.add_submodule("evit_bias", PoolSizeBias(edit.num_prefix_tokens, heads))
    like = site.like
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_after(max((sizes, like), key=order.__getitem__)):
        bias = graph.call_module("evit_bias", (sizes, like))
    if site.multihead is not None or (site.fused and len(op.args) <= 3):
        op.update_kwarg("attn_mask", bias)
    elif site.fused:
        op.update_arg(3, bias)
    else:
        with graph.inserting_after(bias):
            logits = graph.call_function(_add_bias, (like, bias))
        op.update_arg(0, logits)
    graph.lint()
    gm.recompile()
    gm.train(pool.training)
    return gm
