"""What ranks the image tokens: attention scores as pure, shape-documented tensor functions.

Notation: ``B`` batch, ``H`` heads, ``N`` tokens (prefix included), ``P`` prefix tokens
(class, distillation, register tokens; always first), ``C`` channels, ``D`` head dim.
Nothing here knows about models or graphs; a reduction (``evit_patch.reductions``) decides
what becomes of the tokens once they are ranked.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax in at least float32: bf16 [CLS] logits would blur the top-k ranking. (Not
    ``torch.promote_types``: that is a dispatched operator, microseconds at batch 1.)"""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype`` (no operation when it already is: each costs microseconds at batch 1)."""
    return x if x.dtype == dtype else x.to(dtype)


def _masked(logits: Tensor, bias: Tensor | None) -> Tensor:
    """Apply SDPA's ``attn_mask`` semantics: a boolean mask keeps ``True``, a float one is added."""
    if bias is None:
        return logits
    if bias.dtype == torch.bool:
        return logits.masked_fill(~bias, float("-inf"))
    return logits + _as(bias, logits.dtype)


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
    logits = (_as(q[:, :, :1], dtype) @ _as(k, dtype).transpose(-2, -1)) * scale
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
