"""The family registry: a family joins by decorating its class with :func:`register_family`."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedModelError
from .base import Family, describe

_FAMILIES: list[Family] = []


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: instantiate and register a :class:`Family`."""
    _FAMILIES.append(cls())
    return cls


def register_refusal(family: Family) -> Family:
    """Register an instance (used for families refused by name)."""
    _FAMILIES.append(family)
    return family


def find_family(model: nn.Module) -> Family:
    """The family responsible for ``model``: of those whose ``matches`` accepts it, the one whose
    claimed class comes first in the model's MRO (see :meth:`Family.specificity`).

    Raises:
        UnsupportedModelError: no family matches; the message lists the supported ones.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"evit_patch.apply expects a torch.nn.Module vision transformer, got {type(model).__name__}"
        )
    matching = [family for family in _FAMILIES if family.matches(model)]
    if matching:
        # The most specific wins, whatever the import order: a family claiming a subclass (or a
        # refusal of one) beats one claiming its base class; ties go to the first registered.
        return min(matching, key=lambda family: family.specificity(model))
    supported = ", ".join(f.name for f in _FAMILIES if f.supported)
    raise UnsupportedModelError(
        f"{describe(model)} is not a vision transformer evit_patch knows: no registered family "
        f"matches it (supported: {supported})"
    )


@dataclass(frozen=True)
class SupportEntry:
    """One row of the supported-models table."""

    family: str
    supported: bool
    notes: str


def list_supported(pattern: str = "*", *, include_refused: bool = True) -> list[SupportEntry]:
    """Families the registry knows, filtered by a wildcard ``pattern`` as in ``timm.list_models``."""
    return [
        SupportEntry(f.name, f.supported, f.notes)
        for f in _FAMILIES
        if fnmatch.fnmatch(f.name, pattern) and (include_refused or f.supported)
    ]
