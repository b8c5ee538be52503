"""``apply``: the one verb. Copy, trace, locate, rewrite; the caller's model is never touched."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn

from .config import EViTConfig, _check_keep
from .errors import InvalidPlanError
from .families import describe, find_family
from .profile import ModelProfile, profile_of, trace_blocks
from .reorganizer import TokenReorganizer
from .rewrite import insert_reorganizer

PROFILE_ATTR = "evit_profile"
"""Attribute holding the :class:`ModelProfile` of a patched model."""


def apply(
    model: nn.Module,
    layers: int | Iterable[int] = (3, 6, 9),
    keep: float | Iterable[float] = 0.7,
    *,
    fuse: bool = True,
) -> nn.Module:
    """Return an EViT copy of ``model`` that reorganizes tokens after attention at ``layers``.

    The copy is the same class as ``model`` with the chosen blocks replaced by traced graphs
    that hold a :class:`TokenReorganizer`; parameters, ``state_dict`` keys and attributes
    (``pretrained_cfg``, ``num_classes``, ...) are unchanged. Blocks are traced in eval mode: an
    attention dropout inside fused SDPA is fixed to off (pretrained ViTs have none); dropout and
    drop-path modules keep following ``.train()``/``.eval()``.

    Args:
        model: a supported vision transformer (see :func:`list_supported`).
        layers: 0-indexed blocks that reorganize.
        keep: fraction of image tokens kept at each layer, one rate or one per layer, in (0, 1].
        fuse: fuse the dropped tokens into one extra token (EViT's inattentive fusion).

    Raises:
        UnsupportedModelError: the model or a block cannot be patched soundly (nothing changed).
        InvalidPlanError: ``layers``/``keep`` are malformed for this model.
    """
    family = find_family(model)
    family.check(model)
    config = EViTConfig.build(layers, keep, fuse, num_blocks=len(family.blocks(model)), where=describe(model))
    patched = copy.deepcopy(model)
    traced = trace_blocks(patched, family)
    for layer, rate in zip(config.layers, config.keep):
        block = traced[layer]
        reorganizer = TokenReorganizer(
            rate,
            num_prefix_tokens=family.num_prefix_tokens(patched),
            source=block.site.source,
            fuse=config.fuse,
            scale=block.site.scale,
            layer=layer,
        )
        gm = insert_reorganizer(block.graph_module, block.site, reorganizer)
        patched.set_submodule(block.name, gm)
    setattr(patched, PROFILE_ATTR, profile_of(traced, patched, family))
    return patched


def reorganizers(model: nn.Module) -> list[TokenReorganizer]:
    """The model's :class:`TokenReorganizer` modules, by layer (empty for an unpatched model)."""
    return sorted((m for m in model.modules() if isinstance(m, TokenReorganizer)), key=lambda m: m.layer)


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(model, PROFILE_ATTR, None), ModelProfile)


def _require_patched(model: nn.Module, what: str) -> list[TokenReorganizer]:
    mods = reorganizers(model)
    if not is_patched(model) or not mods:
        raise InvalidPlanError(f"{what}: {describe(model)} is not an evit_patch model; call evit_patch.apply first")
    return mods


def get_config(model: nn.Module) -> EViTConfig:
    """The live EViT configuration of a patched model, read from its reorganizers."""
    mods = _require_patched(model, "get_config")
    return EViTConfig(tuple(m.layer for m in mods), tuple(m.keep for m in mods), mods[0].fuse)


def set_keep(model: nn.Module, keep: float | Iterable[float]) -> None:
    """Change keep rates in place on a patched model, without re-tracing (keep-rate warm-up).

    ``keep`` is one rate for all reorganizing layers or one per layer. Under ``torch.compile``
    a new keep value that changes a token count triggers one recompilation.
    """
    mods = _require_patched(model, "set_keep")
    keeps = [keep] * len(mods) if not isinstance(keep, Iterable) else list(keep)
    if len(keeps) != len(mods):
        raise InvalidPlanError(
            f"set_keep: got {len(keeps)} keep rates for {len(mods)} reorganizing layers {[m.layer for m in mods]}"
        )
    checked = [_check_keep(k, f"set_keep, layer {m.layer}") for m, k in zip(mods, keeps)]
    for m, k in zip(mods, checked):
        m.keep = k
