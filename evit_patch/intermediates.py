"""timm's ``forward_intermediates``/``get_intermediate_layers`` on a patched model.

After a reorganizing block the tokens are fewer and no longer a grid, so timm's reshape to
``(B, C, H, W)`` would fail with a bare ``shape '[...]' is invalid``. A patched model gets an
instance attribute that shadows the class's method: it serves what is sound (block outputs before
the first reorganization, and the final features) and refuses the rest with the reason.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .errors import UnsupportedInputError
from .families import describe


class GuardedIntermediates:
    """``model.forward_intermediates`` of a patched timm model (picklable; copies follow the model)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x, indices=None, *args, **kwargs):
        from timm.models._features import feature_take_indices

        from .state import reorganizers

        model = self.model
        first = min((m.layer for m in reorganizers(model)), default=None)
        take, _ = feature_take_indices(len(model.blocks), indices)
        late = sorted(int(i) for i in take if first is not None and i >= first)
        if late:
            raise UnsupportedInputError(
                f"forward_intermediates: {describe(model)} reorganizes tokens from block {first} on, so the "
                f"outputs of blocks {late} hold fewer tokens and no spatial grid; take blocks before {first} "
                "(the final features are returned as usual), or call the original model"
            )
        if kwargs.get("norm") and isinstance(getattr(model, "norm", None), fx.GraphModule):
            raise UnsupportedInputError(
                f"forward_intermediates: {describe(model)}'s final norm carries EViT's token-size weights "
                "(average pool); call with norm=False"
            )
        return type(model).forward_intermediates(model, x, indices, *args, **kwargs)


def guard_intermediates(model: nn.Module) -> None:
    """Shadow ``forward_intermediates`` on a patched model whose class has one (timm ViT, BEiT, EVA)."""
    if callable(getattr(type(model), "forward_intermediates", None)) and hasattr(model, "blocks"):
        model.forward_intermediates = GuardedIntermediates(model)
