"""Where each surviving token came from: the state position-aware families share across blocks.

The core pass rewrites one block at a time, and a model hands its blocks nothing but the token
tensor. Relative position bias (BEiT), rotary tables (EVA, RoPE-ViT) and size-weighted average
pooling need more: the original position of every token after a reorganization, and how many
original tokens a fused token stands for. A :class:`TokenTrack` carries both within one forward
pass: the first block starts it, reorganizers update it, position-dependent ops read it, and the
model's final norm clears it, so no tensor outlives the call (``torch.export`` requires that).
Like any stateful module, one patched model must not run forward in two threads at once.

Positions index the model's image tokens; :attr:`TokenTrack.fused_position` (one past the last)
marks a fused token, which gets a neutral bias and the identity rotation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import EViTError


class TokenTrack(nn.Module):
    """Positions and sizes of the current image tokens; ``None`` while nothing was reorganized."""

    def __init__(self, num_prefix_tokens: int, num_image_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.num_image_tokens = int(num_image_tokens)
        self.positions: Tensor | None = None
        """``(B, M)`` original image-token index of each current image token."""
        self.sizes: Tensor | None = None
        """``(B, M)`` original image tokens each current one stands for (1, or more once fused)."""
        self.active = False
        """Between the first block and the final norm of one forward pass."""

    @property
    def fused_position(self) -> int:
        return self.num_image_tokens

    def clear(self) -> None:
        self.positions = self.sizes = None

    def start(self, num_tokens: int) -> None:
        """A new forward pass over ``num_tokens`` tokens (the image size may vary per call)."""
        self.clear()
        self.num_image_tokens = num_tokens - self.num_prefix_tokens
        self.active = True

    def finish(self) -> None:
        self.clear()
        self.active = False

    def record(self, kept_index: Tensor, fused: bool, where: str = "") -> None:
        """Follow a reorganization that kept ``kept_index`` ``(B, k)`` and maybe appended a fused token."""
        self.require_active(where)
        batch, count = kept_index.shape[0], self.num_image_tokens
        if self.positions is None:
            positions = torch.arange(count, device=kept_index.device).expand(batch, count)
            sizes = torch.ones(batch, count, device=kept_index.device)
        else:
            positions, sizes = self.positions, self.sizes
        new_positions, new_sizes = positions.gather(1, kept_index), sizes.gather(1, kept_index)
        if fused:
            sentinel = torch.full_like(new_positions[:, :1], self.fused_position)
            new_positions = torch.cat([new_positions, sentinel], dim=1)
            new_sizes = torch.cat([new_sizes, sizes.sum(1, keepdim=True) - new_sizes.sum(1, keepdim=True)], dim=1)
        self.positions, self.sizes = new_positions, new_sizes

    def require_active(self, where: str) -> None:
        if not self.active:
            raise EViTError(
                f"{where}: the token track was used outside a forward pass of the whole model; a "
                "position-aware patched model runs its blocks in order from the first, once per call, "
                "so gradient checkpointing (set_grad_checkpointing), which re-runs blocks during "
                "backward, is not supported"
            )

    def check(self, num_tokens: int, where: str) -> None:
        """Fail loudly if the blocks did not run in order from the first (the state is stale)."""
        self.require_active(where)
        if self.positions is not None and self.positions.shape[1] != num_tokens - self.num_prefix_tokens:
            raise EViTError(
                f"{where}: the token track holds {self.positions.shape[1]} image tokens but the block "
                f"received {num_tokens - self.num_prefix_tokens}; a position-aware patched model must run "
                "its blocks in order, starting from the first, one forward pass at a time"
            )

    def token_index(self) -> Tensor:
        """``(B, P + M)`` index into the original token sequence; the fused token maps one past the end."""
        assert self.positions is not None
        batch = self.positions.shape[0]
        prefix = torch.arange(self.num_prefix_tokens, device=self.positions.device).expand(batch, -1)
        return torch.cat([prefix, self.positions + self.num_prefix_tokens], dim=1)


def gather_bias(bias: Tensor, index: Tensor) -> Tensor:
    """Per-sample rows and columns of an attention bias built for the original token order.

    Args:
        bias: ``(N, N)``, ``(H, N, N)`` or ``(1, H, N, N)`` additive bias (or boolean mask) over
            the original ``N`` tokens, shared by the batch.
        index: ``(B, N')`` original index of each current token, ``N`` for a fused token, which
            gets a neutral entry (0, or ``True`` for a boolean mask).

    Returns:
        ``(B, H, N', N')`` (``H`` is 1 for an ``(N, N)`` bias).
    """
    if bias.dim() == 4 and bias.shape[0] != 1 or bias.dim() not in (2, 3, 4):
        raise EViTError(f"expected a position bias shared by the batch, (1, H, N, N), got {tuple(bias.shape)}")
    heads = bias.reshape(-1, *bias.shape[-2:])
    padded = F.pad(heads, (0, 1, 0, 1), value=True if bias.dtype == torch.bool else 0.0)
    return padded[:, index.unsqueeze(-1), index.unsqueeze(-2)].transpose(0, 1)


def gather_rope(rope: Tensor, positions: Tensor) -> Tensor:
    """Per-sample rows of a ``[sin, cos]`` rotary table (timm's layout) over the image tokens.

    Args:
        rope: ``(M, 2D)`` or ``(H, M, 2D)`` table for the original ``M`` image tokens.
        positions: ``(B, M')`` original image-token index, ``M`` for a fused token (no rotation).

    Returns:
        ``(B, 1, M', 2D)`` or ``(B, H, M', 2D)``, broadcasting over heads as timm's patch dropout does.
    """
    half = rope.shape[-1] // 2
    identity = torch.cat([rope.new_zeros(half), rope.new_ones(rope.shape[-1] - half)])
    padded = torch.cat([rope, identity.expand(*rope.shape[:-2], 1, -1)], dim=-2)
    if rope.dim() == 2:
        return padded[positions].unsqueeze(1)
    return padded[:, positions].transpose(0, 1)


def pool_weights(sizes: Tensor, num_prefix: int) -> Tensor:
    """``(B, P + M, 1)`` factors that make a plain mean over image tokens the size-weighted mean.

    ``mean_j(w_j x_j) = sum_j s_j x_j / sum_j s_j`` with ``w_j = s_j M / sum_j s_j``; prefix tokens keep 1.
    """
    count = sizes.shape[1]
    weights = sizes * (count / sizes.sum(dim=1, keepdim=True))
    prefix = weights.new_ones(weights.shape[0], num_prefix)
    return torch.cat([prefix, weights], dim=1).unsqueeze(-1)


class TrackStart(nn.Module):
    """First block: a new forward pass starts with every token at its own position."""

    def __init__(self, track: TokenTrack) -> None:
        super().__init__()
        self.track = track

    def forward(self, x: Tensor) -> Tensor:
        self.track.start(x.shape[1])
        return x


class PositionGather(nn.Module):
    """A table built for the original token order, re-indexed for the current tokens: an attention
    bias (``kind="bias"``, see :func:`gather_bias`) or a rotary table (``kind="rope"``, see
    :func:`gather_rope`)."""

    def __init__(self, track: TokenTrack, kind: str, where: str) -> None:
        super().__init__()
        if kind not in ("bias", "rope"):
            raise ValueError(f"kind must be 'bias' or 'rope', got {kind!r}")
        self.track, self.kind, self.where = track, kind, where

    def forward(self, table: Tensor, x: Tensor) -> Tensor:
        self.track.check(x.shape[1], self.where)
        if self.track.positions is None:
            return table
        if self.kind == "bias":
            return gather_bias(table, self.track.token_index()).to(table.dtype)
        return gather_rope(table, self.track.positions)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class SizeWeightedTokens(nn.Module):
    """After the final norm: scale image tokens so the model's own mean pool weights fused tokens
    by how many tokens they stand for; then end the forward pass's track."""

    def __init__(self, track: TokenTrack, weighted: bool, where: str = "") -> None:
        super().__init__()
        self.track, self.weighted, self.where = track, bool(weighted), where

    def forward(self, x: Tensor) -> Tensor:
        self.track.check(x.shape[1], self.where)
        sizes = self.track.sizes
        self.track.finish()
        if sizes is None or not self.weighted:
            return x
        return x * pool_weights(sizes, self.track.num_prefix_tokens).to(x.dtype)

    def extra_repr(self) -> str:
        return f"weighted={self.weighted}"
