"""timm's ``Eva`` (EVA-02, RoPE-ViT, DINOv3): rotary position embeddings passed to every block.

The model hands each block a ``[sin, cos]`` table for the original image tokens (``rope``); the
patched blocks keep it a graph input and re-index it per sample by each surviving token's
original position; the fused token gets the identity rotation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import describe
from .registry import register_family
from .timm_vit import TimmVisionTransformer, check_pool


@register_family
class TimmEva(TimmVisionTransformer):
    name = "timm.Eva"
    notes = (
        "eva02_*, vit_*_rope_* (axial and mixed RoPE), DINOv3 ViTs: rotary tables follow each "
        "surviving token's original position (fused token: no rotation); class token or average "
        "pooling, as for timm.VisionTransformer"
    )

    classes = frozenset({"timm.models.eva.Eva"})

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__ == "timm.models.eva" and type(model).__name__ == "Eva"

    def check(self, model: nn.Module) -> None:
        who = describe(model)
        if model.patch_drop is not None:
            raise UnsupportedModelError(
                f"{who} drops patches at random in training (patch_drop_rate > 0); expected none: both "
                "would select tokens"
            )
        check_pool(model, who)

    def rotary_args(self, model: nn.Module) -> tuple[str, ...]:
        return ("rope",) if model.rope is not None else ()

    def block_inputs(self, model: nn.Module, index: int) -> dict[str, torch.Tensor]:
        if model.rope is None:
            return {}
        rope = model.rope.get_embed(shape=list(model.patch_embed.grid_size))
        return {"rope": rope[index] if getattr(model, "rope_mixed", False) else rope}
