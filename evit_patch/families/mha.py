"""``nn.MultiheadAttention`` re-expressed with SDPA on the same parameters (torchvision, open_clip).

``nn.MultiheadAttention`` is an opaque leaf for fx: its q and k never reach the traced graph. A
family swaps it, in the copy being traced, for :class:`SDPAMultiheadAttention`, which computes the
same self-attention from the same ``in_proj``/``out_proj`` parameters, so the structural locator
sees q and k and the state-dict keys stay the library's.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModelError

EXPECTED = "a batch-first nn.MultiheadAttention with packed in_proj, no bias_k/bias_v, no add_zero_attn"


class SDPAMultiheadAttention(nn.Module):
    """Self-attention of an ``nn.MultiheadAttention`` with the same parameters, via SDPA.

    Holds the very same ``in_proj_weight``, ``in_proj_bias`` and ``out_proj`` objects, so the
    parameter names match ``nn.MultiheadAttention``'s, and takes its arguments. Attention dropout
    is off (the block is traced in eval mode, as for timm). ``key_padding_mask`` and ``attn_mask``
    are accepted for callers that pass them (open_clip passes ``attn_mask=None`` to its vision
    blocks) and must be ``None``: a block is traced with its mask at that default, and a guard
    refuses any other at call time. The attention weights are not computed (``None``).
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: None = None,
        need_weights: bool = True,
        attn_mask: None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        if key is not query or value is not query:
            raise UnsupportedModelError(
                "nn.MultiheadAttention: expected self-attention, attn(x, x, x), found distinct query, key and value"
            )
        if not self.batch_first:
            query = query.transpose(0, 1)
        batch, tokens, channels = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
        out = self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, channels))
        return (out if self.batch_first else out.transpose(0, 1)), None


def check_multihead_attention(mha: nn.Module, where: str, expected: str = EXPECTED) -> None:
    """Raise unless ``mha`` (found at ``where``) is an attention :class:`SDPAMultiheadAttention` can
    stand for (batch-first unless ``expected`` says otherwise)."""
    ok = (
        isinstance(mha, nn.MultiheadAttention)
        and (mha.batch_first or expected != EXPECTED)
        and mha._qkv_same_embed_dim
        and mha.bias_k is None
        and mha.bias_v is None
        and not mha.add_zero_attn
    )
    if not ok:
        raise UnsupportedModelError(f"{where}: expected {expected}, found {mha!r}")


def with_sdpa_attention(block: nn.Module, attribute: str) -> nn.Module:
    """A shallow copy of ``block`` whose ``attribute`` (an ``nn.MultiheadAttention``) is re-expressed
    with SDPA; ``block`` itself is left as it is (a family's ``prepare_block``)."""
    prepared = copy.copy(block)
    prepared._modules = dict(block._modules)
    setattr(prepared, attribute, SDPAMultiheadAttention(getattr(block, attribute)))
    return prepared


ANY_LAYOUT = "an nn.MultiheadAttention with packed in_proj, no bias_k/bias_v, no add_zero_attn"


def with_sdpa_everywhere(block: nn.Module, where: str) -> nn.Module:
    """``block``, or a copy of it in which every ``nn.MultiheadAttention`` (at any depth, batch-first
    or not) is re-expressed with SDPA: only the modules on the way to one are copied, shallowly, so
    every parameter stays the same object under the same name. ``block`` itself is not modified."""
    replaced = {}
    for name, child in block._modules.items():
        if isinstance(child, nn.MultiheadAttention):
            check_multihead_attention(child, f"{where}.{name}", ANY_LAYOUT)
            replaced[name] = SDPAMultiheadAttention(child)
        elif child is not None and any(isinstance(m, nn.MultiheadAttention) for m in child.modules()):
            replaced[name] = with_sdpa_everywhere(child, f"{where}.{name}")
    if not replaced:
        return block
    prepared = copy.copy(block)
    prepared._modules = {**block._modules, **replaced}
    return prepared
