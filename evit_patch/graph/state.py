"""Reading and changing the EViT state of a patched model: its reorganizers are the one source."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from ..checks import check_rates
from ..config import EViTConfig, _check_keep
from ..errors import InvalidPlanError, UnsupportedInputError
from ..families import describe, find_family
from ..token_state import restore as restore_tokens
from ..token_state import unpack
from .profile import PROFILE_ATTR, ModelProfile
from .reorganizer import TokenReorganizer

CONFIG_ATTR = "evit_config"
"""Attribute holding the :class:`EViTConfig` a model was patched with; the keep rates it reports
are always read from the reorganizers (``set_keep`` changes them)."""


def reorganizers(model: nn.Module) -> list[TokenReorganizer]:
    """The model's :class:`TokenReorganizer` modules, by layer (empty for an unpatched model)."""
    return sorted((m for m in model.modules() if isinstance(m, TokenReorganizer)), key=lambda m: m.layer)


def check_not_patched(model: nn.Module, what: str = "apply") -> None:
    """Refuse to patch a model that already holds reorganizers: each block would reorganize twice."""
    if not isinstance(model, nn.Module):
        return  # find_family refuses it, naming the type
    layers = [m.layer for m in reorganizers(model)]
    if layers:
        raise InvalidPlanError(
            f"{what}: {describe(model)} is already patched (reorganizes at layers {layers}); change its keep "
            "rates with evit_patch.set_keep(model, keep), or apply to the original, unpatched model"
        )


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(model, PROFILE_ATTR, None), ModelProfile)


def _require_patched(model: nn.Module, what: str, hint: str = "") -> list[TokenReorganizer]:
    mods = reorganizers(model)
    if not is_patched(model) or not mods:
        raise InvalidPlanError(
            f"{what}: {describe(model)} is not an evit_patch model; call evit_patch.apply first{hint}"
        )
    return mods


def get_config(model: nn.Module, *, what: str = "get_config", hint: str = "") -> EViTConfig:
    """The live EViT configuration of a patched model: as it was built, with the keep rates read
    from its reorganizers (``set_keep`` changes them).

    ``what`` and ``hint`` name the caller in the error raised for an unpatched model.
    """
    mods = _require_patched(model, what, hint)
    built: EViTConfig = getattr(model, CONFIG_ATTR)
    return built.replace(layers=tuple(m.layer for m in mods), keep=tuple(m.keep for m in mods))


def set_keep(model: nn.Module, keep: float | Iterable[float]) -> None:
    """Change keep rates in place on a patched model, without re-tracing (keep-rate warm-up).

    ``keep`` is one rate for all reorganizing layers or one per layer. Under ``torch.compile``
    a new keep value that changes a token count triggers one recompilation.
    """
    mods = _require_patched(model, "set_keep")
    check_rates(keep, "keep", "set_keep")
    keeps = [keep] * len(mods) if not isinstance(keep, Iterable) else list(keep)
    if len(keeps) != len(mods):
        raise InvalidPlanError(
            f"set_keep: got {len(keeps)} keep rates for {len(mods)} reorganizing layers {[m.layer for m in mods]}"
        )
    checked = [_check_keep(k, f"set_keep, layer {m.layer}") for m, k in zip(mods, keeps)]
    for m, k in zip(mods, checked):
        m.keep = k


def split_state(hidden: Tensor, model: nn.Module) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(tokens, positions, sizes)`` of a hidden state seen inside a patched model, e.g. by a forward
    hook on a block: the tokens with the library's width, the original image-token index of each
    image token (``-1``: EViT's fused token) and the patches each stands for, ``(B, M')`` each; both
    ``None`` while no token has moved. ``model`` is the patched model the hidden state comes from."""
    channels, prefix, patches = _layout(model, "split_state")
    return unpack(hidden, channels, prefix, patches)


def restore(hidden: Tensor, model: nn.Module) -> Tensor:
    """A hidden state seen inside a model patched with ``dense=True`` (e.g. by a forward hook on a
    block), restored to the original's ``(B, P + G, C)``: every patch position gets the feature of the
    token that stands for it now (a merged token's for each patch merged into it, EViT's fused token's
    for each patch fused), prefix tokens as they are. Exact (the hidden state itself) while nothing
    has moved. Differentiable, and traceable by ``torch.compile`` and ``torch.export``.

    Raises:
        UnsupportedInputError: ``model`` is not patched, or was patched without ``dense=True`` and
            ``hidden`` is reorganized.
    """
    channels, prefix, patches = _layout(model, "restore")
    return restore_tokens(hidden, channels, prefix, patches)


def _layout(model: nn.Module, what: str) -> tuple[int, int, int | None]:
    """``(channels, prefix tokens, patches carried or None)`` of a patched model's token state."""
    profile = getattr(model, PROFILE_ATTR, None)
    if profile is None:
        raise UnsupportedInputError(f"{what}: {describe(model)} is not an evit_patch model; pass the patched model")
    prefix = profile.num_prefix_tokens
    patches = None
    if getattr(model, CONFIG_ATTR).dense:
        patches = find_family(model).num_tokens(model) - prefix
    return profile.costs[0].channels, prefix, patches
