"""The module the graph pass inserts into each chosen block.

It is a leaf of the patched block's graph, so its keep rate is a plain attribute that can be
changed after patching (keep-rate warm-up) without re-tracing.
"""

from __future__ import annotations

import enum

from torch import Tensor, nn

from .reorganize import (
    cls_attention_from_probs,
    cls_attention_from_qk,
    num_kept,
    received_attention_from_probs,
    received_attention_from_qk,
    reorganize,
)
from .token_track import TokenTrack


class ScoreSource(enum.Enum):
    """Where the block's attention exposes what the [CLS] score is computed from."""

    QUERY_KEY = "query_key"
    """Fused attention: recompute the [CLS] row from ``q`` and ``k``."""
    PROBABILITIES = "probabilities"
    """Manual attention: read the [CLS] row of the softmax output."""


class Score(enum.Enum):
    """What ranks the image tokens."""

    CLS = "cls"
    """EViT: the class token's attention, averaged over heads."""
    RECEIVED = "received"
    """No class token: attention received from every query, averaged over heads and queries."""


class TokenReorganizer(nn.Module):
    """EViT reorganization at one block: keep the attentive tokens, fuse the rest.

    Called as ``reorg(x, q, k[, bias])`` (query/key source) or ``reorg(x, probs)``
    (probabilities), where ``x`` is the residual stream right after the attention residual add and
    ``bias`` the attention's additive mask. ``keep >= 1``, or a keep rate that keeps every token,
    returns ``x`` itself: an exact no-op. With a ``track``, it records where the kept tokens came from.
    """

    def __init__(
        self,
        keep: float,
        *,
        num_prefix_tokens: int,
        source: ScoreSource,
        fuse: bool = True,
        scale: float | None = None,
        layer: int = -1,
        score: Score = Score.CLS,
        track: TokenTrack | None = None,
        fuse_mean: bool = False,
    ) -> None:
        super().__init__()
        self.keep = float(keep)
        self.fuse = bool(fuse)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.source = source
        self.scale = scale
        self.layer = int(layer)
        self.score = score
        self.track = track
        self.fuse_mean = bool(fuse_mean)
        """Fuse with normalised weights (average-pooled heads); EViT's raw weights otherwise."""
        self.force = False
        """Benchmarks only: reorganize (score, sort, gather) even when every token is kept."""

    def scores(self, attn_a: Tensor, attn_b: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """``(B, N - P)`` importance of each image token."""
        cls = self.score is Score.CLS
        if self.source is ScoreSource.QUERY_KEY:
            from_qk = cls_attention_from_qk if cls else received_attention_from_qk
            return from_qk(attn_a, attn_b, self.num_prefix_tokens, self.scale, bias)
        from_probs = cls_attention_from_probs if cls else received_attention_from_probs
        return from_probs(attn_a, self.num_prefix_tokens)

    def forward(self, x: Tensor, attn_a: Tensor, attn_b: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        num_image = x.shape[1] - self.num_prefix_tokens
        keep = min(num_kept(num_image, self.keep), num_image)
        dropped = keep < num_image
        if not dropped and not self.force:
            return x
        fuse = self.fuse and dropped
        out = reorganize(x, self.scores(attn_a, attn_b, bias), self.num_prefix_tokens, keep, fuse, self.fuse_mean)
        if self.track is not None:
            self.track.record(out.kept_index, fuse, f"layer {self.layer}")
        return out.tokens

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer}, keep={self.keep}, fuse={self.fuse}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, source={self.source.value}, score={self.score.value}"
        )
