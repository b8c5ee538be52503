"""The reduction registry: a method joins by decorating its class with :func:`register_reduction`."""

from __future__ import annotations

from ..errors import InvalidPlanError
from ..options import Method
from .base import Reduction

_REDUCTIONS: dict[str, type[Reduction]] = {}


def register_reduction(cls: type[Reduction]) -> type[Reduction]:
    """Class decorator: make ``cls`` selectable as ``method=cls.name`` everywhere (``apply``,
    ``plan``, ``calibrate``, saved configs, the CLI's ``--method``)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_reduction: {cls.__name__} needs a non-empty class attribute name")
    known = _REDUCTIONS.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"register_reduction: method {name!r} is already {known.__module__}.{known.__qualname__}")
    _REDUCTIONS[name] = cls
    return cls


def reduction_class(name: str, where: str = "evit_patch") -> type[Reduction]:
    """The registered method called ``name``."""
    try:
        return _REDUCTIONS[str(name.value if hasattr(name, "value") else name)]
    except KeyError:
        raise InvalidPlanError(
            f"{where}: method must be one of {', '.join(repr(n) for n in list_reductions())}, got {name!r}"
        ) from None


def list_reductions() -> list[str]:
    """Names of the registered methods: the built-ins as :class:`~evit_patch.options.Method` lists
    them, then the others in registration order."""
    builtin = [m.value for m in Method if m.value in _REDUCTIONS]
    return builtin + [name for name in _REDUCTIONS if name not in builtin]
