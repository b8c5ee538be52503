"""Token Merging (ToMe; Bolya et al., ICLR 2023) for timm ViTs: a benchmark baseline, not library code.

This is a re-implementation written from the paper's algorithm (not the official
facebookresearch/ToMe code), so evit_patch can be compared with ToMe on the same models and images:

- in every block, between the attention residual and the MLP, *bipartite soft matching*: tokens
  alternate into sets A (even positions) and B (odd); similarity is the cosine similarity of the
  attention keys averaged over heads; the [CLS] token (position 0, in A) never merges; each A token
  picks its most similar B token and the ``r`` most similar edges are merged by a size-weighted
  average; ``r`` is constant or one number per block (fewer when too few tokens are left);
  :func:`schedule` turns ``(r, inflect)`` into the per-block list exactly as the official
  ``tome.utils.parse_r`` does (``inflect`` -1: decreasing, 0: constant, +1: increasing);
- sizes (how many patches each token stands for) are tracked, and *proportional attention* adds
  ``log(size)`` to the attention logits in every block once sizes exist;
- the class-token head reads token 0, which never merges, so nothing is unmerged at the end.
- dense outputs (:func:`tome_intermediates`): ToMe's *unmerge*, as in its Stable Diffusion port,
  gives every original patch the output of the token that carries it: an owner map (B, P) is
  updated at each merge (only when asked for: ``forward`` tracks nothing) and each merged token is
  copied back to every patch it absorbed.

Stateless: the blocks ``Sequential`` is replaced by :class:`ToMeBlocks`, which threads
``(x, size)`` from block to block inside one forward call; parameters and ``state_dict`` keys are
unchanged.

    from tome_baseline import apply_tome
    fast = apply_tome(model, r=13)                 # constant r
    fast = apply_tome(model, r=8, inflect=-0.5)    # decreasing: the 12 blocks merge 12, 11, ..., 4
    fast = apply_tome(model, r=[16] * 6 + [8] * 6)  # one r per block
    grids = tome_intermediates(fast, x, indices=[3, 6, 9, 11])  # 4 x (B, 196, C), unmerged
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_first: bool = True):
    """``merge(x, reduce)`` that merges the ``r`` most similar A->B pairs of ``metric`` (B, N, C).

    Output order: unmerged A tokens in their original order (so [CLS] stays first), then all of B.
    """
    r = min(r, (metric.shape[1] - int(protect_first)) // 2)
    if r <= 0:
        return lambda x, reduce="sum": x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # (B, Na, Nb) cosine similarity
        if protect_first:
            scores[:, 0, :] = -float("inf")
        best, best_b = scores.max(dim=-1)  # each A token's most similar B token
        order = best.argsort(dim=-1, descending=True)
        merged_a, kept_a = order[:, :r], order[:, r:].sort(dim=-1).values
        target_b = best_b.gather(1, merged_a)

    def merge(x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        channels = x.shape[-1]
        kept = a.gather(1, kept_a[..., None].expand(-1, -1, channels))
        moved = a.gather(1, merged_a[..., None].expand(-1, -1, channels))
        b = b.scatter_reduce(1, target_b[..., None].expand(-1, -1, channels), moved, reduce=reduce)
        return torch.cat([kept, b], dim=1)

    return merge


def merge_weighted(merge, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` by a size-weighted average; returns the merged tokens and their sizes (B, N', 1)."""
    size = torch.ones_like(x[..., :1]) if size is None else size
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


def attention_qkv(
    attn: Attention, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm ``Attention`` with proportional attention: the output (B, N, C) and q, k, v (B, heads, N, d).

    ``size`` (B, N, 1) or None (every token stands for one patch: plain attention).
    """
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = None if size is None else size.log().transpose(1, 2)[:, None]  # (B, 1, 1, N): log(size) per key
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))))
    return out, q, k, v


def cls_attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """The [CLS] row of the attention probabilities (B, heads, N), proportional attention included.

    Recomputed from the q and k that feed the fused kernel: softmax(q_cls . k^T * scale + log(size)).
    """
    logits = (q[:, :, :1] @ k.transpose(-1, -2))[:, :, 0] * attn.scale
    if size is not None:
        logits = logits + size.log().transpose(1, 2)
    return logits.softmax(dim=-1)


def attention(attn: Attention, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention`` with proportional attention; also returns the head-averaged keys (B, N, d)."""
    out, _, k, _ = attention_qkv(attn, x, size)
    return out, k.mean(dim=1)


def follow(merge, owner: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``owner`` (B, P) after ``merge``: for each original patch, the index of the token that now carries it.

    ``owner`` holds indices into the ``num_tokens`` tokens before the merge; the merge is applied to
    the identity (B, N, N), each row one token's indicator, so its ``amax`` rows say which old tokens
    each new token absorbed, and the argmax over new tokens is each old token's destination.
    """
    batch = owner.shape[0]
    identity = torch.eye(num_tokens, device=owner.device).expand(batch, num_tokens, num_tokens)
    destination = merge(identity, "amax").argmax(dim=1)  # (B, N): old token -> new token
    return destination.gather(1, owner)


def tracked_block(
    blk: Block, x: torch.Tensor, size: torch.Tensor | None, r: int, owner: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`block`, also carrying ``owner`` (B, P; see :func:`follow`) through the merge; None: not tracked."""
    out, keys = attention(blk.attn, blk.norm1(x), size)
    x = x + blk.drop_path1(blk.ls1(out))
    if r > 0:
        merge = bipartite_soft_matching(keys, r)
        if owner is not None:
            owner = follow(merge, owner, x.shape[1])
        x, size = merge_weighted(merge, x, size)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size, owner


def block(blk: Block, x: torch.Tensor, size: torch.Tensor | None, r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One ToMe block: attention, merge ``r`` tokens, MLP."""
    x, size, _ = tracked_block(blk, x, size, r, None)
    return x, size


def schedule(depth: int, r: int | float | list[int], inflect: float = 0.0) -> list[int]:
    """Tokens to merge in each of ``depth`` blocks, as the official ``tome.utils.parse_r`` computes them.

    A list is taken as it is (padded with zeros to ``depth``); a number ``r`` with ``inflect`` in
    [-1, 1] is a straight line of mean ``r`` from ``int(r * (1 - inflect))`` at the first block to
    ``2 r - int(r * (1 - inflect))`` at the last, each entry truncated to an int: ``inflect`` 0 is
    constant ``r`` (for an integer ``r``), -1 decreases from ``2 r`` to 0, +1 increases from 0 to ``2 r``.
    """
    if isinstance(r, (list, tuple)):
        if inflect != 0:
            raise ValueError("ToMe baseline: inflect applies to a number r, not to a list")
        if len(r) > depth:
            raise ValueError(f"ToMe baseline: {len(r)} values of r for {depth} blocks")
        values = [*r, *[0] * (depth - len(r))]
    else:
        if not -1 <= inflect <= 1:
            raise ValueError(f"ToMe baseline: inflect must be in [-1, 1], got {inflect}")
        first = int(r * (1.0 - inflect))
        step = (2 * r - 2 * first) / max(depth - 1, 1)
        values = [int(first + step * i) for i in range(depth)]
    if any(not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"ToMe baseline: r must be integers >= 0, got {values}")
    return values


class ToMeBlocks(nn.Sequential):
    """The model's blocks, run with ToMe: ``(x, size)`` is threaded from block to block."""

    def __init__(self, blocks: nn.Sequential, r: list[int]):
        super().__init__(*blocks)
        self.r = list(r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = None
        for blk, r in zip(self, self.r):
            x, size = block(blk, x, size, r)
        return x

    def extra_repr(self) -> str:
        return f"r={self.r}"


def check_model(model: nn.Module, who: str) -> None:
    """Raise unless ``model`` is a class-token timm ``VisionTransformer`` of plain blocks (what the baselines run)."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{who}: expected a timm VisionTransformer, got {type(model).__name__}")
    if model.cls_token is None or model.num_prefix_tokens != 1 or model.global_pool != "token":
        raise ValueError(f"{who}: only a class token, no other prefix tokens, and global_pool='token'")
    for index, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention or blk.attn.gate is not None:
            raise ValueError(f"{who}: block {index} is not a plain timm Block with ungated Attention")


def apply_tome(model: nn.Module, r: int | float | list[int], inflect: float = 0.0) -> nn.Module:
    """A deep copy of a class-token timm ``VisionTransformer`` that merges ``schedule(depth, r, inflect)`` tokens."""
    check_model(model, "ToMe baseline")
    values = schedule(len(model.blocks), r, inflect)
    merged = copy.deepcopy(model)
    merged.blocks = ToMeBlocks(merged.blocks, values)
    return merged


def unmerge(x: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """The full grid (B, P, C) from the current tokens ``x`` (B, N, C): patch ``p`` gets ``x[:, owner[:, p]]``."""
    return x.gather(1, owner[..., None].expand(-1, -1, x.shape[-1]))


def tome_intermediates(
    model: nn.Module, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = True
) -> list[torch.Tensor]:
    """Image-token features (B, P, C) after the blocks ``indices`` of an :func:`apply_tome` model, unmerged.

    ToMe's unmerge (as in its Stable Diffusion port): each original patch keeps the index of the
    token that carries it (an owner map (B, P), updated at every merge by :func:`follow`), and each
    merged token's output is copied back to every patch it absorbed. ``indices`` as timm's
    ``forward_intermediates`` takes them (the last n blocks for an int, negative indices count from
    the end); ``norm``: the model's final norm is applied to each (per token, so before or after the
    unmerge is the same), as ``forward_intermediates(norm=True)`` does. With ``r=0`` the result is
    the original's ``forward_intermediates(x, indices, norm=norm, output_fmt="NLC", intermediates_only=True)``.
    """
    from timm.models._features import feature_take_indices

    blocks = model.blocks
    if not isinstance(blocks, ToMeBlocks):
        raise TypeError(f"tome_intermediates: expected a model from apply_tome, got blocks {type(blocks).__name__}")
    take, _ = feature_take_indices(len(blocks), indices)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    prefix = model.num_prefix_tokens
    owner = torch.arange(prefix, x.shape[1], device=x.device).expand(x.shape[0], -1)
    size, grids = None, []
    for index, (blk, r) in enumerate(zip(blocks, blocks.r)):
        x, size, owner = tracked_block(blk, x, size, r, owner)
        if index in take:
            grids.append(unmerge(model.norm(x) if norm else x, owner))
    return grids
