"""Token merging onto EViT's choice: every token not kept joins the kept token it resembles most."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Mix, Reduction, rows
from .registry import register_reduction


@register_reduction
class Merge(Reduction):
    """Keep the top-``k`` image tokens by score, as EViT chooses them; average every other token into
    the kept token whose key it resembles most (cosine of the keys averaged over heads), each weighted
    by the patches it stands for, so a token that already stands for many weighs as many. Later
    attention adds ``log(size)`` (proportional attention). The best training-free method measured here
    (docs/training-free.md)."""

    name = "merge"
    needs_keys = True
    weighs_sizes = True
    proportional = True

    @classmethod
    def default_layers(cls, num_blocks: int, budget: bool) -> tuple[int, ...]:
        """Merging loses least in many gentle steps: under a budget, every block from D/4 on (3-11 of 12)."""
        if budget:
            return tuple(range(max(1, round(num_blocks / 4)), num_blocks))
        return super().default_layers(num_blocks, budget)

    def macs(self, num_image: int, kept: int, *, channels: int, key_dim: int) -> int:
        return (num_image - kept) * kept * key_dim  # the (M - k) x k key similarities

    def select(self, x, scores, *, keys, sizes, num_prefix, num_keep) -> Mix:
        num_image = scores.shape[1]
        order = scores.topk(num_image, dim=1, largest=True, sorted=True).indices
        ranked = rows(F.normalize(keys[:, num_prefix:], dim=-1), order)  # one row gather for kept and moved
        # einsum, not moved @ kept.transpose(1, 2): under torch.compile(mode="max-autotune-no-cudagraphs")
        # (torch 2.14, CPU), inductor gave matmul's batch broadcast the batch size a dynamic graph was compiled
        # at, which failed at any other batch (issue 23); einsum issues the same bmm.
        into = torch.einsum("bmd,bkd->bmk", ranked[:, num_keep:], ranked[:, :num_keep]).argmax(dim=-1)
        return Mix(order[:, :num_keep], order[:, num_keep:], into, weight=sizes, mean=True)
