"""Families refused by name until they have their own file: the reason is what users see."""

from __future__ import annotations

from .base import RefusedFamily
from .registry import register_refusal

register_refusal(
    RefusedFamily(
        "timm.VisionTransformerRelPos",
        {"timm.models.vision_transformer_relpos.VisionTransformerRelPos"},
        "relative position bias applied by a module that indexes it by token position from its own "
        "buffers, not as an attention mask evit_patch could re-index",
    )
)
register_refusal(
    RefusedFamily(
        "timm.SwinTransformer",
        {
            "timm.models.swin_transformer.SwinTransformer",
            "timm.models.swin_transformer_v2.SwinTransformerV2",
        },
        "windowed attention on a fixed 2-D token grid with no class token: dropping tokens breaks the windows",
    )
)
