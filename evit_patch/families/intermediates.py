"""Per-block outputs ("intermediates") of a patched model, as the libraries' own methods return them.

After the first reorganizing block a block's output holds fewer tokens, in an order of its own, so
a library's reshape to ``(B, C, H, W)`` would fail, or worse, succeed on a wrong shape. A model
patched with ``dense=True`` carries which token stands for each patch, and its intermediates are
served restored to the full grid (:func:`restored`); otherwise blocks from the first reorganizing
one on are refused with the reason (:func:`refuse_late`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import UnsupportedInputError
from ..token_state import restore
from .base import describe


def refuse_late(model: nn.Module, first: int, taken: Iterable[int], what: str = "forward_intermediates") -> None:
    """Refuse block outputs from ``first`` (the first reorganizing block) on, naming them and the ways out."""
    late = sorted(int(i) for i in taken if i >= first)
    if late:
        raise UnsupportedInputError(
            f"{what}: {describe(model)} reorganizes tokens from block {first} on, so the "
            f"outputs of blocks {late} hold fewer tokens and no spatial grid; take blocks before {first} "
            "(the final features are returned as usual), patch with evit_patch.apply(..., dense=True) to get "
            "every block restored to the full grid, or call the original model"
        )


def restored(
    taken: Iterable[tuple[Tensor, Tensor] | Tensor],
    *,
    channels: int,
    prefix: int,
    patches: int,
    norm: Callable[[Tensor], Tensor] | None,
    grid: tuple[int, int] | None,
) -> tuple[list[Tensor], list[Tensor]]:
    """``(grids, prefix_tokens)`` from a library's raw intermediates of a dense model: each
    ``(image_tokens, prefix_tokens)`` pair (or whole sequence without prefix tokens), token state
    included, restored to every patch, normed by ``norm`` (per token, so after restoring equals before),
    and reshaped to ``(B, C, rows, cols)`` for a ``grid`` (``None``: ``(B, patches, C)``)."""
    grids, prefixes = [], []
    for item in taken:
        full = torch.cat([item[1], item[0]], dim=1) if prefix else item
        full = restore(full, channels, prefix, patches)
        full = norm(full) if norm is not None else full
        prefixes.append(full[:, :prefix])
        grids.append(full[:, prefix:])
    if grid is not None:
        rows, cols = grid
        grids = [g.reshape(g.shape[0], rows, cols, -1).permute(0, 3, 1, 2).contiguous() for g in grids]
    return grids, prefixes
