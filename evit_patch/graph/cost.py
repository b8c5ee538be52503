"""Analytic multiply-accumulate counts of a transformer block as a function of its token counts.

Counted like ``torch.utils.flop_counter``: projections, attention matmuls and the matmuls the
reorganization adds (the [CLS] row, and whatever the reduction declares: EViT's fused token,
merging's key similarities); norms, activations, softmax, sorting and index operations are free.
This is what ``explain`` prints and what the tests hold against ``FlopCounterMode``. The locator
names the nodes (``locate.BlockSite``); everything counted is counted here. Token counts come from
the reduction's survivor rule (:meth:`~evit_patch.reductions.Reduction.tokens_after`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError
from ..reductions import Reduction
from .locate import BlockSite, linear_core
from .reorganizer import ScoreSource


@dataclass(frozen=True)
class BlockCost:
    """Per-block constants read off the traced graph."""

    pre_macs_per_token: int
    """Projections before the attention residual add (qkv, output projection)."""
    post_macs_per_token: int
    """Projections after it (the MLP)."""
    qk_width: int
    """heads x query/key dim: cost of one query-key dot product over all heads."""
    v_width: int
    """heads x value dim."""
    channels: int
    num_prefix_tokens: int
    recomputes_cls_row: bool
    """Fused attention: the score is recomputed from q and k."""
    fixed_macs: int = 0
    """Per-call MACs that do not scale with the tokens (a relative-position bias MLP)."""
    key_dim: int = 0
    """Width of one head's key: merging compares keys averaged over heads."""

    def tokens_out(self, tokens_in: int, keep: float | None, reduction: Reduction, prefix_only: bool = False) -> int:
        """Tokens the MLP sees when the block reorganizes at ``keep`` (``None``: not patched);
        ``prefix_only``: the block's MLP runs on the prefix tokens alone (a class-token head's last block)."""
        prefix = self.num_prefix_tokens
        return prefix if prefix_only else prefix + reduction.tokens_after(tokens_in - prefix, keep)

    def macs(
        self,
        tokens_in: int,
        keep: float | None = None,
        reduction: Reduction | None = None,
        received: bool = False,
        prefix_only: bool = False,
    ) -> int:
        """MACs of one sample through the block, reorganizing at ``keep`` (``None``: not patched);
        ``received``: the score is the attention every token receives, whose recomputation costs
        the whole ``N x N`` map, not one row; ``prefix_only``: see :meth:`tokens_out`."""
        tokens_out = tokens_in
        if reduction is not None:
            tokens_out = self.tokens_out(tokens_in, keep, reduction, prefix_only)
        total = self.fixed_macs + tokens_in * self.pre_macs_per_token
        total += tokens_in * tokens_in * (self.qk_width + self.v_width)
        total += tokens_out * self.post_macs_per_token
        num_image = tokens_in - self.num_prefix_tokens
        if reduction is not None and keep is not None and reduction.drops(num_image, keep):
            if self.recomputes_cls_row:
                total += tokens_in * self.qk_width * (tokens_in if received else 1)
            kept = self.tokens_out(tokens_in, keep, reduction) - self.num_prefix_tokens - reduction.extra_tokens
            total += reduction.macs(num_image, kept, channels=self.channels, key_dim=self.key_dim)
        return total


def _weight_shape(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, int]:
    """``(out_features, in_features)`` of a projection node (``nn.Linear``, or ``F.linear`` with a stored weight)."""
    if node.op == "call_module":
        module = linear_core(modules[node.target])
        return module.out_features, module.in_features
    weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    out_features, in_features = operator.attrgetter(weight.target)(node.graph.owning_module).shape
    return out_features, in_features


def _projection_macs(node: fx.Node, modules: dict[str, nn.Module]) -> int:
    """Multiply-accumulates per row of a projection node (an adapter's low-rank Linears included)."""
    if node.op == "call_module":
        return sum(m.in_features * m.out_features for m in modules[node.target].modules() if isinstance(m, nn.Linear))
    return math.prod(_weight_shape(node, modules))


def _shape(node: object, where: str) -> torch.Size:
    meta = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(meta, torch.Tensor):
        raise UnsupportedModelError(f"{where}: could not infer the shape of {node}")
    return meta.shape


def _attention_widths(site: BlockSite) -> tuple[int, int, int]:
    """``(heads * qk_dim, heads * v_dim, heads)`` read from shape-propagated metadata."""
    op = site.attention
    if site.source is ScoreSource.QUERY_KEY:
        q = _shape(op.args[0] if op.args else op.kwargs["query"], site.where)
        v = _shape(op.args[2] if len(op.args) > 2 else op.kwargs["value"], site.where)
    else:
        q, v = _shape(site.queries, site.where), _shape(site.values, site.where)
    if len(q) != 4 or len(v) != 4:
        raise UnsupportedModelError(
            f"{site.where}: expected (batch, heads, tokens, dim) attention inputs, found {tuple(q)}"
        )
    return q[1] * q[3], v[1] * v[3], q[1]


def block_cost(site: BlockSite, *, channels: int, num_prefix_tokens: int) -> BlockCost:
    """The block's analytic cost; needs shapes on the graph (``node.meta["val"]``, see ``profile.py``)."""
    qk_width, v_width, heads = _attention_widths(site)
    modules = dict(site.attention.graph.owning_module.named_modules())
    table_macs = 0
    for node in site.tables:
        rows = math.prod(_shape(node.all_input_nodes[0], site.where)) // _weight_shape(node, modules)[1]
        table_macs += rows * _projection_macs(node, modules)
    return BlockCost(
        pre_macs_per_token=sum(_projection_macs(n, modules) for n in site.before),
        post_macs_per_token=sum(_projection_macs(n, modules) for n in site.after),
        qk_width=qk_width,
        v_width=v_width,
        channels=channels,
        num_prefix_tokens=num_prefix_tokens,
        recomputes_cls_row=site.source is ScoreSource.QUERY_KEY,
        fixed_macs=table_macs,
        key_dim=qk_width // heads,
    )
