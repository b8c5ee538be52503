"""EViT exactly (Liang et al., ICLR 2022): keep the most attended tokens, fuse the rest into one."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

from ..options import Pool
from .base import Mix, Reduction, mix_tokens
from .registry import register_reduction

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PlanOptions


@register_reduction
class EViT(Reduction):
    """Keep the top-``k`` image tokens by score; fuse the others into one token appended last, their
    sum weighted by their raw scores (not renormalised), as the official code does; with
    ``fuse=False`` drop them.

    ``mean``: fuse with normalised weights, a token on the scale of the ones it replaces, for heads
    that average the tokens or pool them with attention (see ``docs/how-it-works.md``).
    """

    name = "evit"
    accepts = frozenset({"fuse"})

    def __init__(self, fuse: bool = True, mean: bool = False) -> None:
        self.fuse, self.mean = bool(fuse), bool(mean)

    @classmethod
    def from_plan(cls, options: PlanOptions, pool: Pool) -> EViT:
        return cls(fuse=options.fuse, mean=pool is not Pool.TOKEN)

    @property
    def extra_tokens(self) -> int:
        return int(self.fuse)

    def macs(self, num_image: int, kept: int, *, channels: int, key_dim: int) -> int:
        return num_image * channels if self.fuse else 0  # the fused token: (1, M) @ (M, C)

    def select(self, x, scores, *, keys, sizes, num_prefix, num_keep) -> Mix:
        kept = scores.topk(num_keep, dim=1, largest=True, sorted=True).indices
        if not self.fuse:
            return Mix(kept)
        # Zero the kept tokens' weights: the fused token sums the dropped ones only, and gradients
        # still reach q and k through the dropped tokens' scores.
        return Mix(kept, rest=scores.scatter(1, kept, 0.0), mean=self.mean)

    def __repr__(self) -> str:
        return f"EViT(fuse={self.fuse}, mean={self.mean})"


class Reorganized(NamedTuple):
    """Result of :func:`reorganize`: the tokens, and which image tokens were kept."""

    tokens: Tensor
    """``(B, P + k [+ 1], C)``: prefix, the kept tokens by descending score, then the fused token."""
    kept_index: Tensor
    """``(B, k)`` index of each kept token among the input's image tokens (0 = first after the prefix)."""


def reorganize(
    x: Tensor, scores: Tensor, num_prefix: int, num_keep: int, fuse: bool = True, fuse_mean: bool = False
) -> Reorganized:
    """EViT's reorganization of one batch of tokens, as a plain function.

    Args:
        x: ``(B, N, C)`` tokens.
        scores: ``(B, N - P)`` head-averaged [CLS] attention over the image tokens.
        num_prefix: ``P`` tokens at the front, kept in place.
        num_keep: ``k`` with ``1 <= k <= N - P``.
        fuse: append the fused token ``sum_i a_i x_i`` over the dropped tokens with their raw scores.
        fuse_mean: fuse with normalised weights, ``sum_i a_i x_i / sum_i a_i``.
    """
    num_image = scores.shape[1]
    mix = EViT(fuse and num_keep < num_image, fuse_mean).select(
        x, scores, keys=None, sizes=None, num_prefix=num_prefix, num_keep=num_keep
    )
    return Reorganized(mix_tokens(x, mix, num_prefix), mix.kept)
