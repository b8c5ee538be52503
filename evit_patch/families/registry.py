"""The family registry: a family joins by decorating its class with :func:`register_family`."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedModelError
from .base import Family, class_path, class_path_of, describe
from .discovered import DiscoveredFamily, attached
from .discovery import GUIDE, NoStructure, discover

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
    found = attached(model)
    if found is not None:  # a patched copy of a discovered model
        return found
    matching = [family for family in _FAMILIES if family.matches(model)]
    if matching:
        # The most specific wins, whatever the import order: a family claiming a subclass (or a
        # refusal of one) beats one claiming its base class; ties go to the first registered.
        return min(matching, key=lambda family: family.specificity(model))
    wrapped = _wrapped(model)
    if wrapped:
        raise UnsupportedModelError(f"{describe(model)} is not itself a vision transformer: {wrapped}")
    try:  # registered families first; structural discovery is the fallback
        return DiscoveredFamily(discover(model))
    except NoStructure as exc:
        supported = ", ".join(f.name for f in _FAMILIES if f.supported)
        found = f" (found: {'; '.join(exc.found)})" if exc.found else ""
        raise UnsupportedModelError(
            f"{class_path_of(model)} is not a vision transformer evit_patch knows: no registered family matches "
            f"it, and structural discovery {exc.missing}{found}; supported families: {supported}; to add one, "
            f"see {GUIDE}"
        ) from None


def family_named(name: str, where: str) -> Family:
    """The registered family called ``name`` (as ``save_pretrained`` records it)."""
    from ..errors import CheckpointError

    for family in _FAMILIES:
        if family.name == name and family.supported:
            return family
    raise CheckpointError(f"{where}: no supported model family is called {name!r} (see evit_patch.list_supported())")


def _wrapped(model: nn.Module) -> str | None:
    """What to pass instead when ``model`` wraps one evit_patch knows (DDP, torch.compile, a container)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DataParallel, DistributedDataParallel)):
        return f"it wraps one; pass model.module to evit_patch, then wrap the patched copy in {type(model).__name__}"
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return "it is torch.compile's wrapper; pass model._orig_mod to evit_patch, then torch.compile the patched copy"
    if "peft.peft_model.PeftModel" in class_path(model):
        return (
            "it is a peft PeftModel; patch the base model first and add the adapters to the patched copy "
            "(get_peft_model(evit_patch.apply(base), config)), or merge them (model.merge_and_unload()) and patch "
            "the result, or patch the adapted model inside it, whose LoRA layers are traced as whole projections "
            "(evit_patch.apply(model.get_base_model()))"
        )
    for name, child in model.named_modules():
        if name and any(family.matches(child) for family in _FAMILIES):
            return (
                f"it holds {describe(child)} at {name!r}; pass model.get_submodule({name!r}) to evit_patch and "
                f"put the patched copy in its place (model.set_submodule({name!r}, patched))"
            )
    return None


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
