"""Analytic multiply-accumulate counts of a transformer block as a function of its token counts.

Counted like ``torch.utils.flop_counter``: projections, attention matmuls and the matmuls the
reorganization adds (the [CLS] row, EViT's fused token, merging's key similarities); norms,
activations, softmax, sorting and index operations are free. This is what ``explain`` prints and
what the tests hold against ``FlopCounterMode``. Token counts come from
:func:`~evit_patch.reorganize.tokens_after`, the survivor rule the reorganizer runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import Method
from ..reorganize import num_kept, tokens_after


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

    def tokens_out(self, tokens_in: int, keep: float | None, fuse: bool, method: Method = Method.EVIT) -> int:
        """Tokens the MLP sees when the block reorganizes at ``keep`` (``None``: not patched)."""
        prefix = self.num_prefix_tokens
        return prefix + tokens_after(tokens_in - prefix, keep, method, fuse)

    def macs(
        self,
        tokens_in: int,
        keep: float | None = None,
        fuse: bool = True,
        received: bool = False,
        method: Method = Method.EVIT,
    ) -> int:
        """MACs of one sample through the block, reorganizing at ``keep`` (``None``: not patched);
        ``received``: the score is the attention every token receives, whose recomputation costs
        the whole ``N x N`` map, not one row."""
        tokens_out = self.tokens_out(tokens_in, keep, fuse, method)
        total = self.fixed_macs + tokens_in * self.pre_macs_per_token
        total += tokens_in * tokens_in * (self.qk_width + self.v_width)
        total += tokens_out * self.post_macs_per_token
        num_image = tokens_in - self.num_prefix_tokens
        if keep is not None and num_kept(num_image, keep) < num_image:
            if self.recomputes_cls_row:
                total += tokens_in * self.qk_width * (tokens_in if received else 1)
            if method is Method.MERGE:
                kept = tokens_out - self.num_prefix_tokens
                total += (num_image - kept) * kept * self.key_dim
            elif fuse:
                total += num_image * self.channels
        return total
