"""Families refused by name until they have their own file: the reason is what users see."""

from __future__ import annotations

from .base import RefusedFamily
from .registry import register_refusal

register_refusal(
    RefusedFamily(
        "timm.Beit",
        {"timm.models.beit.Beit"},
        "BEiT adds a relative position bias indexed by token position in every block; after pruning "
        "it would be applied to the wrong tokens",
    )
)
register_refusal(
    RefusedFamily(
        "timm.Eva",
        {"timm.models.eva.Eva"},
        "EVA/EVA02 rotary position tables are frozen per token position; pruned tokens would be "
        "rotated by the wrong angles",
    )
)
register_refusal(
    RefusedFamily(
        "timm.VisionTransformerRelPos",
        {"timm.models.vision_transformer_relpos.VisionTransformerRelPos"},
        "relative position bias indexed by token position (see timm.Beit)",
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
