"""DiffRate (Chen et al., ICCV 2023) inference for timm ViTs: a benchmark baseline, not library code.

DiffRate learns, per block, how many tokens to prune and how many to merge (a differentiable search
on ImageNet); the model itself is unchanged. The learned schedules are data here, transcribed from
the official repository into ``schedules/diffrate.json`` (with its commit and path). This file
re-implements only the inference of the official code (OpenGVLab/DiffRate, ``DiffRate/patch/deit.py``
and ``DiffRate/merge.py``, read at commit 91ae3e3), written anew; docs/benchmarks.md gives its
distance from the official code.

In every block, between the attention residual and the MLP:

1. importance: the [CLS] row of the attention probabilities averaged over heads; proportional
   attention is on (``log(size)`` added to the logits), so the row is the one the block actually
   used, with no further weighting by size;
2. prune: keep [CLS] and the ``prune[i] - 1`` tokens [CLS] attends to most; the rest are dropped
   with their sizes;
3. merge: of the survivors, [CLS] and the ``merge[i] - 1`` most attended are kept; each other
   survivor merges into the kept token (never [CLS]) whose hidden state (``x`` after the attention
   residual, all channels) is most cosine-similar to its own. Not bipartite and not a top-r of
   edges: every less-attended survivor merges, any number into one kept token. A kept token becomes
   the *unweighted* mean of itself and the tokens merged into it, and its size grows by each merged
   token's size times that token's cosine similarity to it (DiffRate's similarity-weighted size;
   sizes stop being integers).

A block keeps ``min(tokens in, prune[i], merge[i])`` tokens, [CLS] included. Token order is
irrelevant (every selection goes by rank or similarity, never by position), so a block that
removes nothing leaves ``x`` exactly as it is; the official code re-sorts tokens by importance in
every block, which changes nothing but float summation order. The published schedules keep 3 tokens
in the last block: only its MLP sees them, and the head reads [CLS].

Stateless: the blocks ``Sequential`` is replaced by :class:`DiffRateBlocks`, which threads
``(x, size)`` from block to block inside one forward call; parameters and ``state_dict`` keys are
unchanged; the input model is deep-copied, never modified.

    from diffrate_baseline import apply_diffrate, published
    fast = apply_diffrate(model, *published("ViT-T-DeiT", "0.8"))
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from timm.models.vision_transformer import Block
from tome_baseline import attention_qkv, check_model, cls_attention
from torch import nn

SCHEDULES = Path(__file__).resolve().parent / "schedules" / "diffrate.json"
MODEL_KEYS = {
    "deit_tiny_patch16_224": "ViT-T-DeiT",
    "deit_small_patch16_224": "ViT-S-DeiT",
    "deit_base_patch16_224": "ViT-B-DeiT",
}
"""timm architecture -> key of ``schedules/diffrate.json`` (the official ``main.py``'s names)."""


def published_table(path: Path = SCHEDULES) -> dict[str, dict[str, dict[str, list[int]]]]:
    """``{model key: {target GFLOPs: {"prune": [...], "merge": [...]}}}`` from ``schedules/diffrate.json``."""
    return json.loads(Path(path).read_text())["schedules"]


def published(model_key: str, gflops: str | float) -> tuple[list[int], list[int]]:
    """DiffRate's published ``(prune, merge)`` token counts for ``model_key`` at ``gflops`` (e.g. ``"0.8"``)."""
    table = published_table()
    if model_key not in table:
        raise KeyError(f"DiffRate: no published schedules for {model_key!r} (have {', '.join(table)})")
    by_flops = table[model_key]
    key = next((k for k in by_flops if float(k) == float(gflops)), None)
    if key is None:
        raise KeyError(f"DiffRate: {model_key} has published schedules at {', '.join(by_flops)} GFLOPs, not {gflops}")
    return list(by_flops[key]["prune"]), list(by_flops[key]["merge"])


def model_key(model: nn.Module) -> str:
    """The ``schedules/diffrate.json`` key of a timm model, from its ``pretrained_cfg`` architecture."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch not in MODEL_KEYS:
        raise KeyError(f"DiffRate: no published schedule for architecture {arch!r} (have {', '.join(MODEL_KEYS)})")
    return MODEL_KEYS[arch]


def merge_into_attended(x: torch.Tensor, size: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffRate's merge of tokens sorted by importance, [CLS] first: ``x`` (B, n, C), ``size`` (B, n, 1).

    Tokens ``keep..n-1`` each merge into the most cosine-similar of tokens ``1..keep-1``; returns
    the ``keep`` tokens (unweighted means) and their sizes (merged sizes scaled by similarity).
    """
    unit = x / x.norm(dim=-1, keepdim=True)
    similarity = unit[:, keep:] @ unit[:, :keep].transpose(1, 2)  # (B, n - keep, keep)
    similarity[..., 0] = -float("inf")  # [CLS] takes no token
    weight, target = similarity.max(dim=-1)  # (B, n - keep): each merged token's destination
    target = target[..., None]
    channels = x.shape[-1]
    total = x[:, :keep].scatter_add(1, target.expand(-1, -1, channels), x[:, keep:])
    count = torch.ones_like(size[:, :keep]).scatter_add(1, target, torch.ones_like(size[:, keep:]))
    size = size[:, :keep].scatter_add(1, target, size[:, keep:] * weight[..., None])
    return total / count, size


def block(
    blk: Block, x: torch.Tensor, size: torch.Tensor | None, prune: int, merge: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One DiffRate block: attention, keep the ``prune`` most [CLS]-attended tokens, merge down to ``merge``, MLP."""
    n = x.shape[1]
    out, q, k, _ = attention_qkv(blk.attn, blk.norm1(x), size)
    x = x + blk.drop_path1(blk.ls1(out))
    survivors = min(n, prune)
    if min(survivors, merge) < n:
        importance = cls_attention(blk.attn, q, k, size).mean(dim=1)[:, 1:]  # (B, n - 1)
        order = importance.argsort(dim=-1, descending=True)[:, : survivors - 1] + 1
        order = torch.cat([torch.zeros_like(order[:, :1]), order], dim=1)  # [CLS], then by importance
        x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        size = torch.ones_like(x[..., :1]) if size is None else size.gather(1, order[..., None])
        if merge < survivors:
            x, size = merge_into_attended(x, size, merge)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size


class DiffRateBlocks(nn.Sequential):
    """The model's blocks, run with DiffRate: ``(x, size)`` is threaded from block to block."""

    def __init__(self, blocks: nn.Sequential, prune: list[int], merge: list[int]):
        super().__init__(*blocks)
        self.prune, self.merge = list(prune), list(merge)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = None
        for blk, prune, merge in zip(self, self.prune, self.merge):
            x, size = block(blk, x, size, prune, merge)
        return x

    def extra_repr(self) -> str:
        return f"prune={self.prune}, merge={self.merge}"


def apply_diffrate(model: nn.Module, prune: list[int], merge: list[int]) -> nn.Module:
    """A deep copy of a class-token timm ``VisionTransformer`` that runs DiffRate with these token counts.

    ``prune[i]`` / ``merge[i]``: tokens ([CLS] included) left after block ``i``'s pruning / merging.
    """
    check_model(model, "DiffRate baseline")
    depth = len(model.blocks)
    if len(prune) != depth or len(merge) != depth:
        raise ValueError(
            f"DiffRate baseline: expected {depth} prune and merge counts, got {len(prune)} and {len(merge)}"
        )
    if any(not isinstance(c, int) or c < 2 for c in (*prune, *merge)):
        raise ValueError("DiffRate baseline: token counts must be integers >= 2 ([CLS] and at least one token)")
    reduced = copy.deepcopy(model)
    reduced.blocks = DiffRateBlocks(reduced.blocks, prune, merge)
    return reduced
