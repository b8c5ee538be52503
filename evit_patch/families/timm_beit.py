"""timm's ``Beit`` (BEiT, BEiT v2): a relative position bias in every block, average pooling.

The bias is built from a table for the original token order; after a reorganization the core
pass re-indexes it per sample by each surviving token's original position (the fused token gets
a zero bias), found structurally as the attention mask that does not depend on the tokens.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import describe
from .registry import register_family
from .timm_vit import TimmVisionTransformer, check_pool


@register_family
class TimmBeit(TimmVisionTransformer):
    name = "timm.Beit"
    notes = (
        "beit_*, beitv2_*: the per-block relative position bias follows each surviving token's "
        "original position (fused token: zero bias); average pooling counts the fused token as the "
        "tokens it stands for. A bias shared across blocks (use_shared_rel_pos_bias) is refused"
    )

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__ == "timm.models.beit" and type(model).__name__ == "Beit"

    def check(self, model: nn.Module) -> None:
        who = describe(model)
        if model.rel_pos_bias is not None:
            raise UnsupportedModelError(
                f"{who} shares one relative position bias across blocks (use_shared_rel_pos_bias=True), "
                "passed to every block as an argument; expected a per-block bias (use_rel_pos_bias=True)"
            )
        check_pool(model, who)
