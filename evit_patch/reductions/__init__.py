"""Token reduction methods: one file each, registered by name (``method="evit"``, ``"merge"``)."""

from .base import Mix, Reduction, destination, drops, follow, follow_owner, mix_tokens, mixing, num_kept, slots
from .dam import DAM
from .evit import EViT, Reorganized, reorganize
from .merge import Merge
from .registry import list_reductions, reduction_class, register_reduction

__all__ = [
    "DAM",
    "EViT",
    "Merge",
    "Mix",
    "Reduction",
    "Reorganized",
    "destination",
    "drops",
    "follow",
    "follow_owner",
    "list_reductions",
    "mix_tokens",
    "mixing",
    "num_kept",
    "reduction_class",
    "register_reduction",
    "reorganize",
    "slots",
]
