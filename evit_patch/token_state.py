"""Where the surviving tokens came from, carried through the forward pass inside the token tensor.

Relative position bias (BEiT), rotary tables (EVA, RoPE-ViT), proportional attention and
size-weighted average and attention pooling need, after a reorganization, the original position of every token
and how many patches it stands for. A model hands its blocks nothing but the token tensor, so
that is where they travel: a reorganizing block appends :data:`STATE_CHANNELS` channels to its
output (see :func:`pack`), every later block and the final norm split them off again (before an
attention-pool head, the final norm passes them on and the head splits them off). Nothing is
stored on a module: concurrent calls, re-run blocks (gradient checkpointing), ``torch.compile``
and ``torch.export`` see a pure function. While no token has moved (every keep rate keeps all
tokens) nothing is appended, so the model computes exactly what the original does.

A position of ``-1`` marks a token without one (EViT's fused token): tables give it their
neutral last row (no bias, no rotation).

A model patched with ``dense=True`` also carries, for every original patch, the index of the
image token that stands for it now (its *owner*): ``G`` patches spread over the ``M`` image rows,
``ceil(G / M)`` more values per row (twice as many digits in 16-bit). :func:`restore` reads it to
give every patch position the feature of its token, the full grid a dense head expects.

This module is the one place that knows the layout. What a user receives never carries it:
families remove it from every output they return per token (:meth:`Family.confine_state`, with
:func:`strip`); a forward hook on a block sees it, and :func:`evit_patch.split_state` decodes it there.
Capacity: two base-256 digits hold values up to 65,535 exactly in every floating dtype from
bfloat16 up, so a model with more image tokens is refused at patch time (:func:`check_capacity`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UnsupportedInputError, UnsupportedModelError

STATE_CHANNELS = 4
"""Appended channels in 16-bit activations: position and size, each as two base-256 digits (exact in
bfloat16, whose mantissa holds integers up to 256). float32 and float64 hold both values exactly as
they are: 2 channels (:data:`RAW_CHANNELS`), half the operations per block."""
RAW_CHANNELS = 2
_BASE = 256
MAX_IMAGE_TOKENS = _BASE * _BASE - 1
"""Most image tokens whose positions (stored plus one) and sizes fit two base-256 digits."""
_CARRIERS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Dtypes that hold every digit 0..255 exactly (fp8 does not)."""
_RAW = (torch.float32, torch.float64)
"""Dtypes that hold every position and size up to :data:`MAX_IMAGE_TOKENS` exactly as one value."""


def check_capacity(num_image_tokens: int, where: str) -> None:
    """Refuse, at patch time, a model whose token state would not round-trip exactly."""
    if num_image_tokens > MAX_IMAGE_TOKENS:
        raise UnsupportedModelError(
            f"{where}: {num_image_tokens} image tokens; evit_patch tracks token positions and sizes exactly "
            f"for at most {MAX_IMAGE_TOKENS} (two base-256 digits each)"
        )


def pack(x: Tensor, positions: Tensor, sizes: Tensor, num_prefix: int, owner: Tensor | None = None) -> Tensor:
    """``(B, N, C + 2)`` (float32, float64) or ``(B, N, C + 4)`` (16-bit): ``x`` with each image token's
    position (plus one) and size appended, as values or as base-256 digits; prefix rows: 0. With
    ``owner`` (``(B, G)``: the image token each original patch belongs to), its values plus one follow,
    ``ceil(G / M)`` per image row (:func:`owner_width`), zero-padded.

    Sizes are whole numbers by construction (sums of whole numbers, see ``reductions.follow``)."""
    if x.dtype not in _CARRIERS:
        raise UnsupportedInputError(
            f"evit_patch: a reorganized model carries token positions and sizes in its activations, which "
            f"needs float16, bfloat16, float32 or float64; got {x.dtype} (run the blocks in one of those, "
            "e.g. quantize weights only)"
        )
    if x.dtype in _RAW:
        state = torch.stack((positions.to(x.dtype) + 1, sizes if sizes.dtype == x.dtype else sizes.to(x.dtype)), dim=-1)
    else:
        digits = []
        for value in (positions + 1, sizes.round().long()):
            digits += [value // _BASE, value % _BASE]
        state = torch.stack(digits, dim=-1).to(x.dtype)
    if owner is not None:
        state = torch.cat([state, _spread_owner(owner, positions.shape[1], x.dtype)], dim=-1)
    return torch.cat([x, F.pad(state, (0, 0, num_prefix, 0))], dim=-1)


def owner_width(num_patches: int, num_image: int) -> int:
    """Values per image row that hold the owners of ``num_patches`` patches over ``num_image`` rows."""
    return -(-num_patches // num_image)


def _spread_owner(owner: Tensor, num_image: int, dtype: torch.dtype) -> Tensor:
    """``(B, M, w)`` (or ``2w`` digits in 16-bit): ``owner + 1`` laid row after row, zero-padded."""
    batch, patches = owner.shape
    width = owner_width(patches, num_image)
    values = F.pad(owner + 1, (0, num_image * width - patches))
    if dtype not in _RAW:
        values = torch.stack((values // _BASE, values % _BASE), dim=-1)
    return values.to(dtype).reshape(batch, num_image, -1)


def unpack(
    x: Tensor, channels: int, num_prefix: int, num_patches: int | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(tokens, positions, sizes)`` from a packed tensor; ``(x, None, None)`` if ``x`` has only
    ``channels`` channels (no token has moved yet). The layout is read off the width: ``channels + 2``
    values, or ``channels + 4`` digits, plus the owners of ``num_patches`` patches (``None``: none
    are carried; see :func:`unpack_owner`)."""
    return unpack_owner(x, channels, num_prefix, num_patches)[:3]


def unpack_owner(
    x: Tensor, channels: int, num_prefix: int, num_patches: int | None
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(tokens, positions, sizes, owner)``; ``owner`` (``(B, G)``, the image token each of the
    ``num_patches`` original patches belongs to) is ``None`` when ``num_patches`` is, or nothing moved."""
    if x.shape[-1] == channels:
        return x, None, None, None
    num_image = x.shape[1] - num_prefix
    width = 0 if num_patches is None else owner_width(num_patches, num_image)
    state = x[:, num_prefix:, channels:]
    if x.shape[-1] == channels + RAW_CHANNELS + width:
        positions = state[..., 0].long() - 1
        sizes = state[..., 1]  # float32 or float64 already: no conversion
        owner = state[..., RAW_CHANNELS:].long() if width else None
    else:
        state = state.round().long()
        positions = state[..., 0] * _BASE + state[..., 1] - 1
        sizes = (state[..., 2] * _BASE + state[..., 3]).to(torch.promote_types(x.dtype, torch.float32))
        owner = None
        if width:
            digits = state[..., STATE_CHANNELS:].reshape(*state.shape[:2], width, 2)
            owner = digits[..., 0] * _BASE + digits[..., 1]
    if owner is not None:
        owner = owner.reshape(owner.shape[0], -1)[:, :num_patches] - 1
    return x[..., :channels], positions, sizes, owner


def restore(x: Tensor, channels: int, num_prefix: int, num_patches: int) -> Tensor:
    """``(B, P + G, C)``: every original patch position gets the feature of the image token that
    carries it (a merged token's feature goes to every patch merged into it, EViT's fused token's
    to every patch fused), prefix rows as they are; ``x`` itself (stripped) while nothing has moved.

    Raises:
        UnsupportedInputError: ``x`` is reorganized but carries no owners (not a ``dense=True`` model).
    """
    tokens, positions, _, owner = unpack_owner(x, channels, num_prefix, num_patches)
    if positions is None:
        if tokens.shape[1] != num_prefix + num_patches:
            raise UnsupportedInputError(
                f"restore: these {x.shape[1]} tokens (of {num_prefix + num_patches}) carry no record of which "
                "patches they stand for: the last block of a model whose head reads only the class token hands "
                "its tokens on without it; restore the blocks before it"
            )
        return tokens
    if owner is None:
        raise UnsupportedInputError(
            f"restore: these {x.shape[1]} tokens carry no record of which patches they stand for; patch the "
            "model with evit_patch.apply(..., dense=True)"
        )
    image = tokens[:, num_prefix:]
    batch, count, width = image.shape
    flat = owner.clamp(min=0) + torch.arange(batch, device=x.device).unsqueeze(1) * count
    grid = image.reshape(batch * count, width).index_select(0, flat.flatten()).view(batch, num_patches, width)
    return torch.cat([tokens[:, :num_prefix], grid], dim=1)


def strip(x: Tensor, channels: int) -> Tensor:
    """``x`` without the state channels (unchanged if it has none): what a family returns to users."""
    return x if x.shape[-1] == channels else x[..., :channels]


def token_index(positions: Tensor, num_prefix: int) -> Tensor:
    """``(B, P + M)`` index into the original token sequence; ``-1`` stays ``-1`` (no position)."""
    batch = positions.shape[0]
    prefix = torch.arange(num_prefix, device=positions.device).expand(batch, -1)
    return torch.cat([prefix, torch.where(positions < 0, positions, positions + num_prefix)], dim=1)


def gather_bias(bias: Tensor, index: Tensor) -> Tensor:
    """Per-sample rows and columns of an attention bias built for the original token order.

    Args:
        bias: ``(N, N)``, ``(H, N, N)`` or ``(1, H, N, N)`` additive bias (or boolean mask) over
            the original ``N`` tokens, shared by the batch.
        index: ``(B, N')`` original index of each current token, ``-1`` for a token without a
            position, which gets a neutral entry (0, or ``True`` for a boolean mask).

    Returns:
        ``(B, H, N', N')`` (``H`` is 1 for an ``(N, N)`` bias).
    """
    if bias.dim() == 4 and bias.shape[0] != 1 or bias.dim() not in (2, 3, 4):
        raise ValueError(f"expected a position bias shared by the batch, (1, H, N, N), got {tuple(bias.shape)}")
    heads = bias.reshape(-1, *bias.shape[-2:])
    padded = F.pad(heads, (0, 1, 0, 1), value=True if bias.dtype == torch.bool else 0.0)
    return padded[:, index.unsqueeze(-1), index.unsqueeze(-2)].transpose(0, 1)


def gather_rope(rope: Tensor, positions: Tensor) -> Tensor:
    """Per-sample rows of a ``[sin, cos]`` rotary table (timm's layout) over the image tokens.

    Args:
        rope: ``(M, 2D)`` or ``(H, M, 2D)`` table for the original ``M`` image tokens.
        positions: ``(B, M')`` original image-token index, ``-1`` for no position (no rotation).

    Returns:
        ``(B, 1, M', 2D)`` or ``(B, H, M', 2D)``, broadcasting over heads as timm's patch dropout does.
    """
    half = rope.shape[-1] // 2
    identity = torch.cat([rope.new_zeros(half), rope.new_ones(rope.shape[-1] - half)])
    padded = torch.cat([rope, identity.expand(*rope.shape[:-2], 1, -1)], dim=-2)
    if rope.dim() == 2:
        return padded[positions].unsqueeze(1)
    return padded[:, positions].transpose(0, 1)


def size_bias(sizes: Tensor, num_prefix: int, dtype: torch.dtype) -> Tensor:
    """``(B, 1, 1, P + M)`` proportional attention: ``log(size)`` added to every query's logit of
    a key, so a token standing for ``s`` patches draws the attention of ``s`` (prefix tokens: 1)."""
    logs = F.pad(sizes.log(), (num_prefix, 0))
    logs = logs if logs.dtype == dtype else logs.to(dtype)
    return logs.view(logs.shape[0], 1, 1, logs.shape[1])


def pool_weights(sizes: Tensor, num_prefix: int) -> Tensor:
    """``(B, P + M, 1)`` factors that make a plain mean over image tokens the size-weighted mean.

    ``mean_j(w_j x_j) = sum_j s_j x_j / sum_j s_j`` with ``w_j = s_j M / sum_j s_j``; prefix tokens keep 1.
    """
    count = sizes.shape[1]
    weights = sizes * (count / sizes.sum(dim=1, keepdim=True))
    return F.pad(weights, (num_prefix, 0), value=1.0).unsqueeze(-1)


class Unpack(nn.Module):
    """Block input: split off the state channels, ``x -> (tokens, positions, sizes, owner)``
    (``owner``: ``None`` unless the model carries the owners of ``num_patches`` patches)."""

    def __init__(self, channels: int, num_prefix_tokens: int, num_patches: int | None = None) -> None:
        super().__init__()
        self.channels, self.num_prefix_tokens = int(channels), int(num_prefix_tokens)
        self.num_patches = None if num_patches is None else int(num_patches)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        return unpack_owner(x, self.channels, self.num_prefix_tokens, self.num_patches)

    def extra_repr(self) -> str:
        return f"channels={self.channels}" + ("" if self.num_patches is None else f", num_patches={self.num_patches}")


class Pack(nn.Module):
    """Block output: append the state channels once some token has moved."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)

    def forward(self, x: Tensor, positions: Tensor | None, sizes: Tensor | None, owner: Tensor | None = None) -> Tensor:
        if positions is None or sizes is None:
            return x
        return pack(x, positions, sizes, self.num_prefix_tokens, owner)


class RopeGather(nn.Module):
    """A rotary table built for the original image tokens, re-indexed for the current ones."""

    def forward(self, table: Tensor, positions: Tensor | None) -> Tensor:
        return table if positions is None else gather_rope(table, positions)


class AttentionBias(nn.Module):
    """The attention's additive mask for the current tokens: the position bias re-indexed by their
    original positions, plus ``log(size)`` per key when ``proportional``. ``None`` stays ``None``
    while no token has moved."""

    def __init__(self, num_prefix_tokens: int, proportional: bool) -> None:
        super().__init__()
        self.num_prefix_tokens, self.proportional = int(num_prefix_tokens), bool(proportional)

    def forward(
        self, bias: Tensor | None, positions: Tensor | None, sizes: Tensor | None, like: Tensor
    ) -> Tensor | None:
        if positions is None or sizes is None:
            return bias
        if bias is not None:
            bias = gather_bias(bias, token_index(positions, self.num_prefix_tokens))
        if not self.proportional:
            return bias
        logs = size_bias(sizes, self.num_prefix_tokens, like.dtype)
        if bias is None:
            return logs
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=like.dtype, device=bias.device).masked_fill(~bias, float("-inf"))
        return bias.to(like.dtype) + logs

    def extra_repr(self) -> str:
        return f"proportional={self.proportional}"


class SizeWeightedTokens(nn.Module):
    """After the final norm: scale image tokens so the model's own mean pool weights each token by
    how many patches it stands for."""

    def forward(self, x: Tensor, sizes: Tensor | None, num_prefix_tokens: int) -> Tensor:
        if sizes is None:
            return x
        return x * pool_weights(sizes, num_prefix_tokens).to(x.dtype)


class PoolSizeBias(nn.Module):
    """The key bias of an attention-pool head (a probe attends over the tokens): ``log(size)`` per
    key, so a fused or merged token that stands for ``s`` patches weighs as ``s`` tokens in the
    probe's softmax, as proportional attention does in the blocks. ``None`` while no token has
    moved (the head computes what it always did).

    ``num_heads=None``: a mask that broadcasts, ``(B, 1, 1, P + M)``, for SDPA's ``attn_mask`` or
    the logits before a softmax; an int: ``nn.MultiheadAttention``'s float ``attn_mask`` layout,
    ``(B * heads, L, P + M)`` for ``L`` queries (``query``: its batch-first query).
    """

    def __init__(self, num_prefix_tokens: int, num_heads: int | None = None) -> None:
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.num_heads = None if num_heads is None else int(num_heads)

    def forward(self, sizes: Tensor | None, like: Tensor) -> Tensor | None:
        if sizes is None:
            return None
        logs = size_bias(sizes, self.num_prefix_tokens, like.dtype)
        if self.num_heads is None:
            return logs
        batch, queries, keys = logs.shape[0], like.shape[1], logs.shape[-1]
        return logs.expand(batch, self.num_heads, queries, keys).reshape(batch * self.num_heads, queries, keys)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


class PrefixTokens(nn.Module):
    """A class-token head's last block: only the prefix tokens go on to its MLP, the rest is dropped
    (exact for a head that reads only them; the block's attention still reads every token)."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)

    def forward(
        self, x: Tensor, positions: Tensor | None, sizes: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        def none(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[:, :0]

        return x[:, : self.num_prefix_tokens], none(positions), none(sizes)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"


STATE_MODULES = (PrefixTokens, Unpack, Pack, RopeGather, AttentionBias, SizeWeightedTokens, PoolSizeBias)
"""Modules the pass inserts: leaves for every tracer, also when pickle re-traces a patched block."""
