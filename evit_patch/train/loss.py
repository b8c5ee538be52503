"""The fine-tuning loss: match the frozen original's soft predictions, plus labels when known."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

UNLABELLED = -1
"""Label of an image with no class (a plain folder of images): it contributes distillation only."""


class LossParts(NamedTuple):
    total: Tensor
    distill: Tensor
    ce: Tensor
    """Cross-entropy over the labelled images of the batch; 0 when there are none."""


def distillation(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The ``T^2`` factor (Hinton et al.) keeps gradient magnitudes comparable across temperatures.
    Computed in float32 even under autocast.
    """
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def finetune_loss(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    *,
    temperature: float = 1.0,
    ce_weight: float = 1.0,
) -> LossParts:
    """Distillation from ``teacher`` logits, plus ``ce_weight`` x cross-entropy on labelled images.

    ``labels`` is ``None`` (``--distill-only``) or one class per image, ``UNLABELLED`` where unknown.
    """
    kd = distillation(student, teacher, temperature)
    ce = torch.zeros((), device=student.device)
    if labels is not None and ce_weight:
        # Sum over the labelled images, divided by their count: no host sync, 0 if none.
        known = (labels != UNLABELLED).sum().clamp(min=1)
        ce = F.cross_entropy(student.float(), labels, ignore_index=UNLABELLED, reduction="sum") / known
    return LossParts(kd + ce_weight * ce, kd, ce)
