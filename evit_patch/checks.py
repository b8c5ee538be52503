"""Type checks of the options users pass, so a wrong type is named rather than half-interpreted.

``fuse="no"`` must not read as ``True``, ``keep="0.7"`` must not be iterated character by
character, and a 0-d tensor must not reach ``list()``. Each check names the option, what was
expected and what was found.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch

from .errors import InvalidPlanError


def _found(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_flag(value: object, name: str, where: str) -> bool:
    """``value`` if it is a bool (or a numpy bool); a clear error for ``"no"``, ``0``, ``None``."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise InvalidPlanError(f"{where}: {name} must be True or False, got {_found(value)}")


def check_rates(value: object, name: str, where: str) -> None:
    """``value`` is a number or a sequence of numbers (not a string, not a tensor)."""
    if isinstance(value, torch.Tensor):
        hint = ".item()" if value.numel() == 1 else ".tolist()"
        raise InvalidPlanError(
            f"{where}: {name} must be a number or a list of numbers, got a tensor of shape "
            f"{tuple(value.shape)}; pass {name}=tensor{hint}"
        )
    if isinstance(value, (str, bytes)) or not isinstance(value, (numbers.Real, Iterable)):
        raise InvalidPlanError(
            f"{where}: {name} must be a number in (0, 1] or a list of them, one per layer, got {_found(value)}"
        )


def check_layers(value: object, where: str) -> None:
    """``value`` is a block index or a sequence of them (not a string, not a tensor)."""
    if isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(value, (numbers.Integral, Iterable)):
        raise InvalidPlanError(f"{where}: layers must be a block index or a list of them, got {_found(value)}")
