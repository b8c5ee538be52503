"""timm's ``Beit`` (BEiT, BEiT v2): a relative position bias in every block, average pooling.

The bias is built from a table for the original token order; after a reorganization the core
pass re-indexes it per sample by each surviving token's original position (the fused token gets
a zero bias), found structurally as the attention mask that does not depend on the tokens. A bias
shared by all blocks arrives as a block argument, which stays a graph input.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import describe
from .registry import register_family
from .timm_vit import TimmVisionTransformer, check_pool


@register_family
class TimmBeit(TimmVisionTransformer):
    name = "timm.Beit"
    notes = (
        "beit_*, beitv2_*: the relative position bias (per block, or shared by all blocks) follows "
        "each surviving token's original position (fused token: zero bias); average pooling counts "
        "the fused token as the tokens it stands for"
    )

    classes = frozenset({"timm.models.beit.Beit"})

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__ == "timm.models.beit" and type(model).__name__ == "Beit"

    def check(self, model: nn.Module) -> None:
        check_pool(model, describe(model))

    def live_args(self, model: nn.Module) -> tuple[str, ...]:
        return ("shared_rel_pos_bias",) if model.rel_pos_bias is not None else ()

    def block_inputs(self, model: nn.Module, index: int) -> dict[str, torch.Tensor]:
        return {"shared_rel_pos_bias": model.rel_pos_bias()} if model.rel_pos_bias is not None else {}
