"""The module the graph pass inserts into each chosen block.

It is a leaf of the patched block's graph, so its keep rate is a plain attribute that can be
changed after patching (keep-rate warm-up) without re-tracing. What it decides is published to
:attr:`TokenReorganizer.published` (a no-op module that hooks can watch), so nothing else has to
re-derive which tokens survived.
"""

from __future__ import annotations

import enum

from torch import Tensor, nn

from ..options import Method, Score
from ..reorganize import (
    Reorganized,
    cls_attention_from_probs,
    cls_attention_from_qk,
    follow,
    merge,
    num_kept,
    received_attention_from_probs,
    received_attention_from_qk,
    reorganize,
)


class ScoreSource(enum.Enum):
    """Where the block's attention exposes what the [CLS] score is computed from."""

    QUERY_KEY = "query_key"
    """Fused attention: recompute the [CLS] row from ``q`` and ``k``."""
    PROBABILITIES = "probabilities"
    """Manual attention: read the [CLS] row of the softmax output."""


class Published(nn.Module):
    """Does nothing; a forward hook on it sees each reorganization as it happens
    (:func:`~evit_patch.track_tokens` listens here)."""

    def forward(self, out: Reorganized, scores: Tensor, sizes: Tensor | None) -> None:
        return None


class TokenReorganizer(nn.Module):
    """EViT reorganization at one block: keep the attentive tokens, fuse or merge the rest.

    Called as ``reorg(x, q, k, bias=...)`` (query/key source) or ``reorg(x, probs, keys=...)``
    (probabilities), where ``x`` is the residual stream right after the attention residual add,
    ``bias`` the attention's additive mask and ``keys`` (``(B, H, N, D)``, or ``(B, H, D, N)`` when
    ``keys_transposed``) what :attr:`Method.MERGE` compares. A ``stateful`` reorganizer also takes
    and returns the tokens' positions and sizes (see :mod:`evit_patch.graph.token_state`).
    ``keep >= 1``, or a keep rate that keeps every token, returns its input: an exact no-op.
    """

    def __init__(
        self,
        keep: float,
        *,
        num_prefix_tokens: int,
        source: ScoreSource,
        method: Method = Method.EVIT,
        fuse: bool = True,
        scale: float | None = None,
        layer: int = -1,
        score: Score = Score.CLS,
        stateful: bool = False,
        fuse_mean: bool = False,
        keys_transposed: bool = False,
    ) -> None:
        super().__init__()
        self.keep = float(keep)
        self.method = method
        self.fuse = bool(fuse)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.source = source
        self.scale = scale
        self.layer = int(layer)
        self.score = score
        self.stateful = bool(stateful)
        self.fuse_mean = bool(fuse_mean)
        """Fuse with normalised weights (average-pooled heads); EViT's raw weights otherwise."""
        self.keys_transposed = bool(keys_transposed)
        self.force = False
        """Benchmarks only: reorganize (score, sort, gather) even when every token is kept."""
        self.published = Published()

    def scores(self, attn_a: Tensor, attn_b: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """``(B, N - P)`` importance of each image token."""
        cls = self.score is Score.CLS
        if self.source is ScoreSource.QUERY_KEY:
            from_qk = cls_attention_from_qk if cls else received_attention_from_qk
            return from_qk(attn_a, attn_b, self.num_prefix_tokens, self.scale, bias)
        from_probs = cls_attention_from_probs if cls else received_attention_from_probs
        return from_probs(attn_a, self.num_prefix_tokens)

    def forward(
        self,
        x: Tensor,
        attn_a: Tensor,
        attn_b: Tensor | None = None,
        *,
        bias: Tensor | None = None,
        keys: Tensor | None = None,
        positions: Tensor | None = None,
        sizes: Tensor | None = None,
    ):
        num_image = x.shape[1] - self.num_prefix_tokens
        keep = min(num_kept(num_image, self.keep), num_image)
        dropped = keep < num_image
        if not dropped and not self.force:
            return (x, positions, sizes) if self.stateful else x
        scores = self.scores(attn_a, attn_b, bias)
        fused = self.method is Method.EVIT and self.fuse and dropped
        if self.method is Method.MERGE and dropped:
            out = merge(x, scores, self._keys(attn_b if keys is None else keys), sizes, self.num_prefix_tokens, keep)
        else:
            out = reorganize(x, scores, self.num_prefix_tokens, keep, fused, self.fuse_mean)
        self.published(out, scores, sizes)
        if not self.stateful:
            return out.tokens
        return (out.tokens, *follow(positions, sizes, out, num_image, fused))

    def _keys(self, keys: Tensor) -> Tensor:
        """``(B, N, D)`` keys averaged over heads."""
        return keys.mean(dim=1).transpose(1, 2) if self.keys_transposed else keys.mean(dim=1)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer}, keep={self.keep}, method={self.method.value}, fuse={self.fuse}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, source={self.source.value}, score={self.score.value}"
        )
