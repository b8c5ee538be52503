"""Analytic multiply-accumulate counts of a transformer block as a function of its token counts.

Counted like ``torch.utils.flop_counter``: projections, attention matmuls and the matmuls the
reorganization adds; norms, activations and softmax are free. This is what ``explain`` prints
and what the tests hold against ``FlopCounterMode``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .reorganize import num_kept


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

    def tokens_out(self, tokens_in: int, keep: float | None, fuse: bool) -> int:
        """Tokens the MLP sees when the block reorganizes at ``keep`` (``None``: not patched)."""
        num_image = tokens_in - self.num_prefix_tokens
        if keep is None or keep >= 1.0:
            return tokens_in
        kept = num_kept(num_image, keep)
        if kept >= num_image:
            return tokens_in
        return self.num_prefix_tokens + kept + int(fuse)

    def macs(self, tokens_in: int, tokens_out: int, fuse: bool = True, received: bool = False) -> int:
        """MACs of one sample through the block; ``received``: the score is the attention every
        token receives, whose recomputation costs the whole ``N x N`` map, not one row."""
        total = self.fixed_macs + tokens_in * self.pre_macs_per_token
        total += tokens_in * tokens_in * (self.qk_width + self.v_width)
        total += tokens_out * self.post_macs_per_token
        if tokens_out != tokens_in:
            if self.recomputes_cls_row:
                total += tokens_in * self.qk_width * (tokens_in if received else 1)
            if fuse:
                total += (tokens_in - self.num_prefix_tokens) * self.channels
        return total
