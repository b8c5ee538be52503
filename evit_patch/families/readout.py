"""How a model's output reads its final tokens, from its behaviour: autograd, then one what-if run.

The *pool point* is the tensor the head reads (the final per-token module's output, or the last
block's). Differentiating a random projection of every output with respect to it says which token
rows the output depends on. Only prefix rows: the head reads the class token(s)
(:attr:`Pool.TOKEN`). Every image row, each with the same gradient: possibly a mean, confirmed by
running the head on fewer image rows that all hold the image tokens' mean (an average gives the
same output; a sum or a max does not): :attr:`Pool.AVG`. Anything else reads every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from ..options import Pool


@dataclass(frozen=True)
class Readout:
    """What the output reads: a pool, or ``pool=None`` and why not."""

    pool: Pool | None
    rows: tuple[int, ...]
    """Token rows the output depends on."""
    why: str = ""


def _float_leaves(output: Any) -> list[Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad]


def read_rows(output: Any, point: Tensor) -> Tensor | None:
    """``d(random projection of the output) / d(point)``, ``None`` if the output does not depend on it."""
    leaves = _float_leaves(output)
    if not leaves:
        return None
    generator = torch.Generator().manual_seed(1)
    total = sum((leaf * torch.randn(leaf.shape, generator=generator).to(leaf)).sum() for leaf in leaves)
    (grad,) = torch.autograd.grad(total, point, allow_unused=True, retain_graph=True)
    return grad


def classify(grad: Tensor | None, prefix: int) -> Readout:
    """The pool the gradient at the pool point suggests (a mean still needs :func:`mean_replacement`)."""
    if grad is None:
        return Readout(None, (), "its output does not depend on the final tokens")
    read = grad.abs().amax(dim=-1).amax(dim=0) > 0
    rows = tuple(int(i) for i in torch.nonzero(read).flatten())
    tokens = int(grad.shape[1])
    if not rows:
        return Readout(None, rows, "its output does not depend on the final tokens")
    if all(r < prefix for r in rows):
        return Readout(Pool.TOKEN, rows)
    image = grad[:, prefix:]
    if len([r for r in rows if r >= prefix]) == tokens - prefix:
        scale = image.abs().amax().clamp_min(torch.finfo(image.dtype).tiny)
        if torch.allclose(image, image[:, :1].expand_as(image), rtol=1e-4, atol=1e-6 * float(scale)):
            return Readout(Pool.AVG, rows)
        return Readout(None, rows, f"its output reads all {tokens} final tokens, each its own way")
    image_rows = [r for r in rows if r >= prefix]
    return Readout(None, rows, f"its output reads {len(image_rows)} of the {tokens - prefix} image tokens one by one")


def mean_replacement(point: Tensor, prefix: int) -> Tensor:
    """The pool point with its image rows replaced by half as many rows, each the image rows' mean:
    an average over the image tokens reads the same from it."""
    image = point[:, prefix:]
    count = max(1, image.shape[1] // 2)
    mean = image.mean(dim=1, keepdim=True).expand(-1, count, -1)
    return torch.cat([point[:, :prefix], mean], dim=1).detach()


def kept_replacement(point: Tensor, prefix: int) -> Tensor:
    """The pool point with half its image rows dropped: a head that reads the prefix only is unmoved."""
    count = max(1, (point.shape[1] - prefix) // 2)
    return point[:, : prefix + count].detach()


def same_output(a: Any, b: Any) -> bool:
    """Outputs equal up to rounding (their structure and every tensor's shape and values)."""
    left, right = tree_leaves(a), tree_leaves(b)
    if len(left) != len(right):
        return False
    for x, y in zip(left, right):
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return False
        if not isinstance(x, Tensor):
            continue
        if x.shape != y.shape:
            return False
        x, y = x.detach().double(), y.detach().double()
        scale = float(y.abs().amax()) if y.numel() else 0.0
        if not torch.allclose(x, y, rtol=1e-3, atol=1e-4 * max(scale, 1e-6)):
            return False
    return True
