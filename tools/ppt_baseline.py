"""PPT (Wu et al., 2023, "PPT: Token Pruning and Pooling for Efficient Vision Transformers") for timm ViTs.

A benchmark baseline, not library code: the inference of the official code (xjwu1024/PPT,
``ppt_deit.py`` and ``tome.py``, read at commit 706bcdd), written anew; docs/benchmarks.md gives its
distance from the official code. At a few blocks (0-indexed: the official ``--pp_loc_list 3 6 9`` is
the 4th, 7th and 10th block), between the attention residual and the MLP, each image removes ``r``
tokens (``min(r, (N - 1) // 2)``, as ToMe caps it) by one of two policies, chosen per image:

- significance scores (ATS): the [CLS] row of the attention probabilities summed over heads
  (proportional attention on: ``log(size)`` added to the logits), times the L2 norm of each token's
  value vector (all heads), [CLS] dropped, normalised to sum 1 over the N - 1 image tokens;
- their variance (unbiased, over the N - 1 tokens) below ``threshold``: *pooling*, ToMe's bipartite
  soft matching on the head-averaged keys with size-weighted averages ([CLS] protected; output
  order: unmerged even-position tokens, then the odd ones) -- ``tome_baseline``'s functions;
- otherwise *pruning*: keep [CLS] and the ``N - 1 - r`` highest-scoring tokens, **in descending
  score order** (the order matters: a later pooling block splits tokens by position), sizes kept.

Sizes start at 1 and proportional attention is on in every block once sizes exist (the official
default ``prop_attn=True``). Both policies leave ``N - r`` tokens, so token counts per block do not
depend on the image. Each policy is computed only when some image of the batch takes it.

Stateless: the blocks ``Sequential`` is replaced by :class:`PPTBlocks`, which threads ``(x, size)``
from block to block inside one forward call; parameters and ``state_dict`` keys are unchanged; the
input model is deep-copied, never modified.

    from ppt_baseline import apply_ppt
    fast = apply_ppt(model, r=50, threshold=7e-5)   # blocks 3, 6, 9: the published DeiT setting
"""

from __future__ import annotations

import copy

import torch
from timm.models.vision_transformer import Block
from tome_baseline import attention_qkv, bipartite_soft_matching, check_model, cls_attention, merge_weighted
from torch import nn

LAYERS = (3, 6, 9)
"""The official ``--pp_loc_list 3 6 9`` (0-indexed blocks), used for DeiT-S and DeiT-T."""
THRESHOLD = 7e-5
"""The official evaluation threshold (README and ``eval.sh``: ``--threshold 7e-5``, DeiT-S off the shelf)."""
R = 50
"""The official ``--r_tokens 50``: 0.80 GMACs on DeiT-T, the paper's DeiT-T point (0.8 GFLOPs)."""


def significance(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None
) -> torch.Tensor:
    """ATS significance scores of the image tokens (B, N - 1), each row summing to 1."""
    cls_row = cls_attention(attn, q, k, size).sum(dim=1)  # (B, N): [CLS] attention summed over heads
    value_norm = v.transpose(1, 2).flatten(2).norm(dim=-1)  # (B, N): each token's value vector, all heads
    scores = (cls_row * value_norm)[:, 1:]
    return scores / scores.sum(dim=1, keepdim=True)


def block(
    blk: Block, x: torch.Tensor, size: torch.Tensor | None, r: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One PPT block: attention, then per image pool (low score variance) or prune ``r`` tokens, MLP.

    Returns ``x``, ``size`` and the per-image choice (B,) bool, True = pooled (None when ``r`` is 0).
    """
    n = x.shape[1]
    r = min(r, (n - 1) // 2)
    out, q, k, v = attention_qkv(blk.attn, blk.norm1(x), size)
    x = x + blk.drop_path1(blk.ls1(out))
    pooled = None
    if r > 0:
        size = torch.ones_like(x[..., :1]) if size is None else size
        scores = significance(blk.attn, q, k, v, size)
        pooled = scores.var(dim=1) < threshold  # (B,)
        results = []
        if pooled.any():
            results.append(merge_weighted(bipartite_soft_matching(k.mean(dim=1), r), x, size))
        if not pooled.all():
            order = scores.argsort(dim=-1, descending=True)[:, : n - 1 - r] + 1
            order = torch.cat([torch.zeros_like(order[:, :1]), order], dim=1)  # [CLS] scores highest officially
            results.append(
                (x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])), size.gather(1, order[..., None]))
            )
        if len(results) == 1:
            x, size = results[0]
        else:
            (pool_x, pool_size), (prune_x, prune_size) = results
            x = torch.where(pooled[:, None, None], pool_x, prune_x)
            size = torch.where(pooled[:, None, None], pool_size, prune_size)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size, pooled


class PPTBlocks(nn.Sequential):
    """The model's blocks, run with PPT at ``layers``: ``(x, size)`` is threaded from block to block."""

    def __init__(self, blocks: nn.Sequential, r: int, threshold: float, layers: tuple[int, ...]):
        super().__init__(*blocks)
        self.r, self.threshold, self.layers = r, threshold, tuple(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = None
        for index, blk in enumerate(self):
            x, size, _ = block(blk, x, size, self.r if index in self.layers else 0, self.threshold)
        return x

    def extra_repr(self) -> str:
        return f"r={self.r}, threshold={self.threshold}, layers={list(self.layers)}"


def apply_ppt(
    model: nn.Module, r: int = R, threshold: float = THRESHOLD, layers: tuple[int, ...] | list[int] = LAYERS
) -> nn.Module:
    """A deep copy of a class-token timm ``VisionTransformer`` that runs PPT at ``layers`` (0-indexed)."""
    check_model(model, "PPT baseline")
    depth = len(model.blocks)
    if not isinstance(r, int) or r < 0:
        raise ValueError(f"PPT baseline: r must be an integer >= 0, got {r!r}")
    if any(not isinstance(i, int) or not 0 <= i < depth for i in layers):
        raise ValueError(f"PPT baseline: layers must be block indices in 0..{depth - 1}, got {list(layers)}")
    reduced = copy.deepcopy(model)
    reduced.blocks = PPTBlocks(reduced.blocks, r, threshold, tuple(layers))
    return reduced
