"""EViT token reorganization as pure, shape-documented tensor functions.

Notation: ``B`` batch, ``H`` heads, ``N`` tokens (prefix included), ``P`` prefix tokens
(class, distillation, register tokens; always first), ``C`` channels, ``D`` head dim.
Nothing here knows about models or graphs; the graph pass wires these into a block.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .options import Method


def num_kept(num_image_tokens: int, keep: float) -> int:
    """Image tokens EViT keeps: ``ceil(keep * (N - P))``, as the official code computes it.

    Depends on the token count alone (no tensor values), so ``torch.compile`` and export see
    a static shape.
    """
    return math.ceil(keep * num_image_tokens)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax in at least float32: bf16 [CLS] logits would blur the top-k ranking."""
    return torch.promote_types(dtype, torch.float32)


def _masked(logits: Tensor, bias: Tensor | None) -> Tensor:
    """Apply SDPA's ``attn_mask`` semantics: a boolean mask keeps ``True``, a float one is added."""
    if bias is None:
        return logits
    if bias.dtype == torch.bool:
        return logits.masked_fill(~bias, float("-inf"))
    return logits + bias.to(logits.dtype)


def cls_attention_from_qk(
    q: Tensor, k: Tensor, num_prefix: int, scale: float | None = None, bias: Tensor | None = None
) -> Tensor:
    """Head-averaged [CLS] attention over image tokens, recomputed from ``q`` and ``k``.

    Fused attention never materialises the ``N x N`` map, so only the class-token row is
    recomputed, ``softmax(q_cls k^T * scale + bias_cls)``, at ``O(N D H)`` cost.

    Args:
        q: ``(B, H, N, D)`` queries exactly as the block's attention used them.
        k: ``(B, H, N, D)`` keys, likewise.
        num_prefix: ``P``; the softmax runs over all ``N`` keys, the prefix columns are dropped after.
        scale: the attention scale; ``None`` means ``D ** -0.5`` (SDPA's default).
        bias: the attention's ``attn_mask`` (``(1 | B, H, N, N)``), e.g. a relative position bias.

    Returns:
        ``(B, N - P)`` scores, in float32 or wider.
    """
    dtype = _score_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q[:, :, :1].to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
    logits = _masked(logits, None if bias is None else bias[..., :1, :])
    return logits.softmax(dim=-1)[:, :, 0, num_prefix:].mean(dim=1)


def received_attention_from_qk(
    q: Tensor, k: Tensor, num_prefix: int, scale: float | None = None, bias: Tensor | None = None
) -> Tensor:
    """Attention each image token receives, averaged over heads and all queries: the score for
    models without a class token.

    Costs one ``N x N`` attention map at the reorganizing blocks only (the other blocks keep
    their fused kernel). Like the [CLS] row, the scores over all ``N`` tokens sum to 1.
    """
    dtype = _score_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = _masked((q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale, bias)
    return received_attention_from_probs(logits.softmax(dim=-1), num_prefix)


def cls_attention_from_probs(probs: Tensor, num_prefix: int) -> Tensor:
    """Head-averaged [CLS] attention taken from an explicit ``(B, H, N, N)`` attention map."""
    return probs[:, :, 0, num_prefix:].to(_score_dtype(probs.dtype)).mean(dim=1)


def received_attention_from_probs(probs: Tensor, num_prefix: int) -> Tensor:
    """Head- and query-averaged attention received by each image token, from a ``(B, H, N, N)`` map."""
    return probs[..., num_prefix:].to(_score_dtype(probs.dtype)).mean(dim=(1, 2))


def tokens_after(num_image_tokens: int, keep: float | None, method: Method = Method.EVIT, fuse: bool = True) -> int:
    """Image tokens leaving a block that reorganizes at ``keep`` (``None``: it does not): the one
    survivor rule that the reorganizer, the cost model, ``explain`` and training all read.

    Keeping every token is an exact no-op (nothing fused, nothing appended); otherwise
    ``ceil(keep * M)`` tokens are kept, plus EViT's fused token.
    """
    if keep is None:
        return num_image_tokens
    kept = num_kept(num_image_tokens, keep)
    if kept >= num_image_tokens:
        return num_image_tokens
    return kept + int(method is Method.EVIT and fuse)


class Reorganized(NamedTuple):
    """Result of :func:`reorganize` or :func:`merge`: the tokens, and how they were made from the input."""

    tokens: Tensor
    """``(B, P + k [+ 1], C)``: prefix, the kept tokens by descending score, then EViT's fused token."""
    kept_index: Tensor
    """``(B, k)`` index of each kept token among the input's image tokens (0 = first after the prefix)."""
    dropped_index: Tensor | None = None
    """:func:`merge` only: ``(B, M - k)`` index of each token merged into a kept one."""
    destination: Tensor | None = None
    """:func:`merge` only: ``(B, M - k)`` the kept token (``0..k-1``) each dropped token joined."""


def reorganize(
    x: Tensor, scores: Tensor, num_prefix: int, num_keep: int, fuse: bool = True, fuse_mean: bool = False
) -> Reorganized:
    """Keep the top-``num_keep`` image tokens by score and optionally fuse the rest into one token.

    The fused token is ``sum_i a_i x_i`` over the dropped tokens with their raw scores ``a_i``
    (not renormalised), appended last, as in the official EViT implementation.

    Args:
        x: ``(B, N, C)`` tokens.
        scores: ``(B, N - P)`` head-averaged [CLS] attention over the image tokens.
        num_prefix: ``P`` tokens at the front, kept in place.
        num_keep: ``k`` with ``1 <= k <= N - P``.
        fuse: append the fused token.
        fuse_mean: fuse with normalised weights, ``sum_i a_i x_i / sum_i a_i``: a token on the scale
            of the ones it replaces, for heads that average the tokens or pool them with attention
            (see ``docs/how-it-works.md``).
    """
    batch, num_tokens, channels = x.shape
    kept_index = scores.topk(num_keep, dim=1, largest=True, sorted=True).indices
    # One row copy for prefix + kept tokens: index_select on the flattened batch is a memcpy per
    # row, an order of magnitude faster on CPU than gather with an index expanded over channels.
    prefix_index = torch.arange(num_prefix, device=x.device).expand(batch, num_prefix)
    rows = torch.cat([prefix_index, kept_index + num_prefix], dim=1)
    rows = rows + torch.arange(batch, device=x.device).unsqueeze(1) * num_tokens
    selected = x.reshape(batch * num_tokens, channels).index_select(0, rows.flatten())
    selected = selected.view(batch, num_prefix + num_keep, channels)
    if not fuse:
        return Reorganized(selected, kept_index)
    # Zero the kept tokens' weights: the fused token sums the dropped ones only, and gradients
    # still reach q and k through the dropped tokens' scores.
    dropped_weight = scores.scatter(1, kept_index, 0.0).to(x.dtype)
    if fuse_mean:
        dropped_weight = dropped_weight / dropped_weight.sum(dim=1, keepdim=True)
    fused = torch.bmm(dropped_weight.unsqueeze(1), x[:, num_prefix:])
    return Reorganized(torch.cat([selected, fused], dim=1), kept_index)


def merge(x: Tensor, scores: Tensor, keys: Tensor, sizes: Tensor | None, num_prefix: int, num_keep: int) -> Reorganized:
    """Keep the top-``num_keep`` image tokens by score; average every other one into the kept token
    whose key it resembles most.

    The kept tokens are chosen as EViT chooses them; a dropped token is not lost but joins its
    most similar kept token (cosine of the keys), and each merged token is the size-weighted mean
    of its members, so a token that already stands for many patches weighs as many.

    Args:
        x: ``(B, N, C)`` tokens.
        scores: ``(B, N - P)`` importance of the image tokens.
        keys: ``(B, N, D)`` features to compare (the block's keys, averaged over heads).
        sizes: ``(B, N - P)`` patches each image token stands for; ``None``: one each.
        num_prefix: ``P`` tokens at the front, kept in place.
        num_keep: ``k`` with ``1 <= k < N - P``.

    Returns:
        The tokens ``(B, P + k, C)``, with ``dropped_index`` and ``destination`` set.
    """
    batch, num_tokens, channels = x.shape
    num_image = num_tokens - num_prefix
    order = scores.topk(num_image, dim=1, largest=True, sorted=True).indices
    kept_index, dropped_index = order[:, :num_keep], order[:, num_keep:]
    image = x[:, num_prefix:]
    features = F.normalize(keys[:, num_prefix:], dim=-1)
    similarity = _rows(features, dropped_index) @ _rows(features, kept_index).transpose(1, 2)
    destination = similarity.argmax(dim=-1)
    if sizes is None:
        sizes = x.new_ones(batch, num_image)
    sizes = sizes.to(x.dtype)
    kept_sizes, dropped_sizes = sizes.gather(1, kept_index), sizes.gather(1, dropped_index)
    # Sums over each kept token's members by one index_add on the flattened batch (exports to
    # ONNX as ScatterND with add, unlike scatter_reduce).
    slots = (destination + torch.arange(batch, device=x.device).unsqueeze(1) * num_keep).flatten()
    total = (_rows(image, kept_index) * kept_sizes.unsqueeze(-1)).reshape(batch * num_keep, channels)
    total = total.index_add(0, slots, (_rows(image, dropped_index) * dropped_sizes.unsqueeze(-1)).flatten(0, 1))
    weight = kept_sizes.flatten().index_add(0, slots, dropped_sizes.flatten())
    merged = (total / weight.unsqueeze(-1)).view(batch, num_keep, channels)
    tokens = torch.cat([x[:, :num_prefix], merged], dim=1)
    return Reorganized(tokens, kept_index, dropped_index, destination)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for ``(B, M, C)`` ``x`` and ``(B, k)`` ``index``, by one row copy."""
    batch, count, channels = x.shape
    flat = index + torch.arange(batch, device=x.device).unsqueeze(1) * count
    return x.reshape(batch * count, channels).index_select(0, flat.flatten()).view(*index.shape, channels)


def follow(
    positions: Tensor | None, sizes: Tensor | None, out: Reorganized, num_image: int, fused: bool
) -> tuple[Tensor, Tensor]:
    """Original positions and sizes of the image tokens after a reorganization.

    Args:
        positions: ``(B, M)`` original image-token index of each entering token; ``None``: ``0..M-1``.
        sizes: ``(B, M)`` patches each entering token stands for; ``None``: one each.
        out: what :func:`reorganize` or :func:`merge` returned for the ``M = num_image`` tokens.
        fused: EViT appended a fused token. It gets position ``-1`` (no position: tables read it
            as their neutral last row) and the dropped tokens' total size.

    Returns:
        ``(positions, sizes)`` of the leaving image tokens; a merged token keeps its kept member's
        position and adds up its members' sizes.
    """
    kept = out.kept_index
    if positions is None:
        positions = torch.arange(num_image, device=kept.device).expand(kept.shape[0], -1)
    if sizes is None:
        sizes = torch.ones(positions.shape, device=kept.device)
    new_positions, new_sizes = positions.gather(1, kept), sizes.gather(1, kept)
    if out.destination is not None:
        new_sizes = new_sizes.scatter_add(1, out.destination, sizes.gather(1, out.dropped_index))
    elif fused:
        new_positions = torch.cat([new_positions, torch.full_like(new_positions[:, :1], -1)], dim=1)
        new_sizes = torch.cat([new_sizes, sizes.sum(1, keepdim=True) - new_sizes.sum(1, keepdim=True)], dim=1)
    return new_positions, new_sizes
