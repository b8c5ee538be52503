"""Distinctive-attended merging: keep the tokens that are both attended and unlike any other; merge the rest.

The best training-free method measured here (docs/training-free.md). A token's importance is what
removing it would change in the class token's attention output: the attention it receives times
how far it would move if merged into its nearest neighbour,

    cost_j = (M * a_j) * (1 - max_i cos(x_j, x_i)),

with ``a`` the [CLS] attention (proportional attention included) and the nearest neighbour taken
on the other side of ToMe's bipartite split (even vs odd positions), so the similarity costs one
``M/2 x M/2`` product. Where the [CLS] attention is still flat (early blocks) the cost ranks tokens
by how redundant they are, as ToMe does; where it is peaked, by attention, as EViT does; a token
that resembles nothing is protected, as PiToMe protects it. So one rule serves every block and no
switch point between similarity and attention has to be chosen per model. Every token not kept
joins the kept token it resembles most (cosine of the tokens), size-weighted; later attention adds
``log(size)``.

Under a budget, the schedule (where reduction starts, how fast the keep rate ramps in) is searched
on synthetic images (:mod:`evit_patch.planning.schedule`), and a class-token head runs the last
block's MLP on the class token alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Mix, Reduction, rows
from .registry import register_reduction


@register_reduction
class DAM(Reduction):
    """Keep the ``k`` image tokens with the largest ``attention x distinctiveness``; merge every other
    token into its most similar kept token (cosine of the tokens), size-weighted."""

    name = "dam"
    weighs_sizes = True
    proportional = True
    searches_schedule = True

    def macs(self, num_image: int, kept: int, *, channels: int, key_dim: int) -> int:
        half = num_image // 2
        bipartite = (num_image - half) * half * channels  # even x odd cosine similarities
        return bipartite + (num_image - kept) * kept * channels  # and each moved token against the kept

    def select(self, x, scores, *, keys, sizes, num_prefix, num_keep) -> Mix:
        num_image, half = scores.shape[1], scores.shape[1] // 2
        unit = F.normalize(x[:, num_prefix:], dim=-1)
        # bmm, not matmul: inductor keeps matmul's broadcast batch static (see merge.py)
        similar = torch.bmm(unit[:, ::2], unit[:, 1::2].transpose(1, 2))
        even, odd = similar.amax(dim=-1), similar.amax(dim=-2)  # each token's nearest on the other side
        nearest = torch.stack([even[:, :half], odd], dim=-1).flatten(1)  # back to positions 0, 1, 2, ...
        if num_image % 2:
            nearest = torch.cat([nearest, even[:, half:]], dim=1)
        nearest = nearest if nearest.dtype == scores.dtype else nearest.to(scores.dtype)
        cost = (scores * num_image).clamp_min(1e-9) * (1 - nearest).clamp_min(1e-6)
        order = cost.topk(num_image, dim=1, largest=True, sorted=True).indices
        ranked = rows(unit, order)  # one row gather serves the kept and the moved tokens
        into = torch.bmm(ranked[:, num_keep:], ranked[:, :num_keep].transpose(1, 2)).argmax(dim=-1)
        return Mix(order[:, :num_keep], order[:, num_keep:], into, weight=sizes, mean=True)
