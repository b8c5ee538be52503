"""timm's ``VisionTransformerRelPos`` (``vit_relpos_*``): a relative position bias per block.

Its attention passes the bias (a table lookup or a small MLP over log-spaced offsets) to SDPA as
``attn_mask``, computed without the tokens, so the core pass finds and re-indexes it as it does
BEiT's; this file only says where the model's parts are.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import describe
from .registry import register_family
from .timm_vit import TimmVisionTransformer, check_pool


@register_family
class TimmVisionTransformerRelPos(TimmVisionTransformer):
    name = "timm.VisionTransformerRelPos"
    notes = (
        "vit_relpos_*: the per-block relative position bias (table or MLP) follows each surviving "
        "token's original position; class token or average pooling. A bias shared across blocks "
        "(vit_srelpos_*) is refused"
    )

    def matches(self, model: nn.Module) -> bool:
        cls = type(model)
        return cls.__module__ == "timm.models.vision_transformer_relpos" and cls.__name__ == "VisionTransformerRelPos"

    def check(self, model: nn.Module) -> None:
        who = describe(model)
        if model.shared_rel_pos is not None:
            raise UnsupportedModelError(
                f"{who} shares one relative position bias across blocks (vit_srelpos_*), passed to every "
                "block as an argument; expected a per-block bias"
            )
        check_pool(model, who)
