"""Model families. Importing this package registers every family file."""

from . import (  # noqa: F401  (registration side effects)
    hf_clip,
    hf_dinov2,
    hf_siglip,
    hf_vit,
    open_clip_vit,
    refused,
    timm_beit,
    timm_eva,
    timm_relpos,
    timm_vit,
    torchvision_vit,
)
from .base import Family, Recipe, describe
from .registry import SupportEntry, family_named, find_family, list_supported, register_family

__all__ = [
    "Family",
    "Recipe",
    "SupportEntry",
    "describe",
    "family_named",
    "find_family",
    "list_supported",
    "register_family",
]
