"""Keep-rate warm-up and learning-rate schedule: pure functions of the optimizer step.

Both are recomputed from the step alone, so resuming needs nothing but the step count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def keep_at(step: int, target: Sequence[float], warmup_steps: int) -> list[float]:
    """EViT's keep-rate warm-up: cosine from 1.0 down to ``target`` over ``warmup_steps``.

    ``keep = target + (1 - target) * (1 + cos(pi * step / warmup_steps)) / 2`` for
    ``step < warmup_steps``, then ``target``: the official EViT ``adjust_keep_rate`` without its
    initial full-keep epochs (a pretrained model needs none). One value per reorganizing layer.
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return [float(t) for t in target]
    weight = 0.5 * (1.0 + math.cos(math.pi * step / warmup_steps))
    return [t + (1.0 - t) * weight for t in target]


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``.

    Warm-up step ``s`` uses ``base_lr * (s + 1) / warmup_steps`` so the first step already moves.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
