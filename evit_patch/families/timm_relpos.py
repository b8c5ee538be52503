"""timm's ``VisionTransformerRelPos`` (``vit_relpos_*``): a relative position bias per block.

Its attention passes the bias (a table lookup or a small MLP over log-spaced offsets) to SDPA as
``attn_mask``, computed without the tokens, so the core pass finds and re-indexes it as it does
BEiT's; this file only says where the model's parts are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .base import describe
from .registry import register_family
from .timm_vit import TimmVisionTransformer, check_pool


@register_family
class TimmVisionTransformerRelPos(TimmVisionTransformer):
    name = "timm.VisionTransformerRelPos"
    notes = (
        "vit_relpos_*, vit_srelpos_*: the relative position bias (table or MLP, per block or shared) "
        "follows each surviving token's original position; class token or average pooling"
    )

    classes = frozenset({"timm.models.vision_transformer_relpos.VisionTransformerRelPos"})

    def matches(self, model: nn.Module) -> bool:
        cls = type(model)
        return cls.__module__ == "timm.models.vision_transformer_relpos" and cls.__name__ == "VisionTransformerRelPos"

    def check(self, model: nn.Module) -> None:
        check_pool(model, describe(model))

    def live_args(self, model: nn.Module) -> tuple[str, ...]:
        return ("shared_rel_pos",) if model.shared_rel_pos is not None else ()

    def outside_macs(self, model: nn.Module, img_size=None) -> int:
        """Embedding and head, plus a shared bias MLP, which the model runs once per call."""
        macs = super().outside_macs(model, img_size)
        if model.shared_rel_pos is not None:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model.shared_rel_pos.get_bias()
            macs += counter.get_total_flops() // 2
        return macs

    def block_inputs(self, model: nn.Module, index: int) -> dict[str, torch.Tensor]:
        return {"shared_rel_pos": model.shared_rel_pos.get_bias()} if model.shared_rel_pos is not None else {}
