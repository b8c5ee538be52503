"""The family discovery makes for a model no registered family claims (``discovery.py``).

It answers every question a family file would, from the :class:`~.discovery.Structure` found in
the model's behaviour; it is attached to the patched copy, so ``explain``, ``track_tokens`` and
``set_keep`` find it again without probing the model anew.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import UnsupportedModelError
from ..options import Pool, Score
from .base import Family, describe
from .discovery import GUIDE, Structure
from .mha import with_sdpa_everywhere
from .restructure import restructure

ATTRIBUTE = "evit_discovered"
"""Attribute of a patched copy holding its :class:`DiscoveredFamily`."""


class DiscoveredFamily(Family):
    """A family made from what discovery found in one model (never registered, never matched by class)."""

    name = "discovered"

    def __init__(self, structure: Structure) -> None:
        self.structure = structure
        self.notes = f"found by structural discovery: {structure.summary()}"

    def matches(self, model: nn.Module) -> bool:
        return False

    def check(self, model: nn.Module) -> None:
        return None

    def prepare_copy(self, model: nn.Module) -> None:
        if self.structure.runner is not None:
            restructure(model, self.structure.runner, self.structure.units, describe(model))

    def prepare_block(self, block: nn.Module) -> nn.Module:
        return with_sdpa_everywhere(block, type(block).__name__)

    def blocks(self, model: nn.Module) -> Sequence[tuple[str, nn.Module]]:
        return [(name, model.get_submodule(name)) for name in self.structure.units]

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return self.structure.prefix

    def channels(self, model: nn.Module) -> int:
        return self.structure.channels

    def _own(self, model: nn.Module, img_size) -> None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size or self.structure.input_size)
        if size != self.structure.input_size:
            height, width = self.structure.input_size
            raise UnsupportedModelError(
                f"{describe(model)}: evit_patch patches a discovered model at the {height}x{width} input it was "
                f"discovered at only; got img_size={img_size!r} (a family can resize it, see {GUIDE})"
            )

    def num_tokens(self, model: nn.Module, img_size=None) -> int:
        self._own(model, img_size)
        return self.structure.tokens

    def outside_macs(self, model: nn.Module, img_size=None) -> int:
        self._own(model, img_size)
        return self.structure.outside_macs

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        return self.structure.input_size

    def in_chans(self, model: nn.Module) -> int:
        return self.structure.in_chans

    def patch_grid(self, model: nn.Module, img_size=None) -> tuple[int, int]:
        self._own(model, img_size)
        if self.structure.grid is None:
            raise UnsupportedModelError(f"{describe(model)}: discovery found no patch grid for its image tokens")
        return self.structure.grid

    def resized(self, model: nn.Module, img_size) -> nn.Module:
        self._own(model, img_size)
        return model

    def score(self, model: nn.Module) -> Score:
        return Score.CLS if self.structure.class_token else Score.RECEIVED

    def pool(self, model: nn.Module) -> Pool:
        return self.structure.pool

    def final_norm(self, model: nn.Module) -> str | None:
        return self.structure.final_norm

    def leaf_types(self) -> tuple[type[nn.Module], ...]:
        return self.structure.leaf_types


def attached(model: nn.Module) -> DiscoveredFamily | None:
    """The family a patched copy was discovered with, if any."""
    family = model.__dict__.get(ATTRIBUTE)
    return family if isinstance(family, DiscoveredFamily) else None
