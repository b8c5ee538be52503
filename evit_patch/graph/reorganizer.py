"""The module the graph pass inserts into each chosen block: it scores the image tokens and hands
them to the model's :class:`~evit_patch.reductions.Reduction`.

It is a leaf of the patched block's graph, so its keep rate is a plain attribute that can be
changed after patching (keep-rate warm-up) without re-tracing. What the reduction decided (its
:class:`~evit_patch.reductions.Mix`) is published to :attr:`TokenReorganizer.published` (a no-op
module that hooks can watch), so nothing else has to re-derive which tokens survived.
"""

from __future__ import annotations

import enum

from torch import Tensor, nn

from ..options import Score
from ..reductions import Mix, Reduction, follow, follow_owner, mix_tokens, num_kept, slots
from ..scores import (
    cls_attention_from_probs,
    cls_attention_from_qk,
    received_attention_from_probs,
    received_attention_from_qk,
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

    def forward(self, mix: Mix, scores: Tensor, sizes: Tensor | None) -> None:
        return None


class TokenReorganizer(nn.Module):
    """Token reduction at one block: score the image tokens, let the reduction keep, merge or fuse them.

    Called as ``reorg(x, q, k, bias=...)`` (query/key source) or ``reorg(x, probs, keys=...)``
    (probabilities), where ``x`` is the residual stream right after the attention residual add,
    ``bias`` the attention's additive mask and ``keys`` (``(B, H, N, D)``, or ``(B, H, D, N)`` when
    ``keys_transposed``) what a reduction that :attr:`~Reduction.needs_keys` compares. A ``stateful``
    reorganizer also takes and returns the tokens' positions and sizes (see
    :mod:`evit_patch.token_state`), a ``dense`` one also which token carries each original patch
    (``owner``). A keep rate that keeps every token returns its input: an
    exact no-op.
    """

    def __init__(
        self,
        keep: float,
        *,
        reduction: Reduction,
        num_prefix_tokens: int,
        source: ScoreSource,
        scale: float | None = None,
        layer: int = -1,
        score: Score = Score.CLS,
        stateful: bool = False,
        keys_transposed: bool = False,
        dense: bool = False,
    ) -> None:
        super().__init__()
        self.keep = float(keep)
        self.reduction = reduction
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.source = source
        self.scale = scale
        self.layer = int(layer)
        self.score = score
        self.stateful = bool(stateful)
        self.keys_transposed = bool(keys_transposed)
        self.dense = bool(dense)
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
        owner: Tensor | None = None,
    ):
        num_image = x.shape[1] - self.num_prefix_tokens
        if not self.reduction.drops(num_image, self.keep):
            if self.dense:
                return x, positions, sizes, owner
            return (x, positions, sizes) if self.stateful else x
        scores = self.scores(attn_a, attn_b, bias)
        metric = self._keys(attn_b if keys is None else keys) if self.reduction.needs_keys else None
        num_keep = min(num_kept(num_image, self.keep), num_image)
        prefix = self.num_prefix_tokens
        mix = self.reduction.select(x, scores, keys=metric, sizes=sizes, num_prefix=prefix, num_keep=num_keep)
        # Built once: which kept token each entering token joins, for the tokens, the sizes and the owners.
        joined = slots(mix, num_image) if mix.moved is not None or self.dense else None
        tokens = mix_tokens(x, mix, prefix, joined)
        self.published(mix, scores, sizes)
        if not self.stateful:
            return tokens
        state = follow(positions, sizes, mix, num_image, joined)
        if self.dense:
            return (tokens, *state, follow_owner(owner, mix, num_image, joined))
        return (tokens, *state)

    def _keys(self, keys: Tensor) -> Tensor:
        """``(B, N, D)`` keys averaged over heads."""
        return keys.mean(dim=1).transpose(1, 2) if self.keys_transposed else keys.mean(dim=1)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer}, keep={self.keep}, reduction={self.reduction!r}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, source={self.source.value}, score={self.score.value}"
            + (", dense=True" if self.dense else "")
        )
