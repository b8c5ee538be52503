"""Accuracy of a patched model and its agreement with the original, on the same batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm


@dataclass(frozen=True)
class Comparison:
    """Original vs patched on one labelled set (fractions in [0, 1])."""

    images: int
    top1_original: float
    top1_patched: float
    top5_original: float
    top5_patched: float
    agreement: float
    """Fraction of images where both models predict the same class."""
    mean_kl: float
    """Mean KL(original || patched) of the softmax outputs, in nats."""


@torch.inference_mode()
def compare(
    original: nn.Module,
    patched: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 64,
    progress: bool = True,
    original_images: torch.Tensor | None = None,
) -> Comparison:
    """Run both models batch by batch and compare their predictions.

    ``original_images``: the same images preprocessed for the original model, when the patched
    model runs at another resolution (same-cost higher resolution).
    """
    original_images = images if original_images is None else original_images
    stats = torch.zeros(6, dtype=torch.float64)
    device = next(original.parameters()).device
    for start in tqdm(range(0, len(images), batch_size), desc="evaluating", disable=not progress):
        x = images[start : start + batch_size].to(device)
        x_original = original_images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        a, b = original(x_original).float(), patched(x).float()
        top5_a, top5_b = a.topk(5, dim=-1).indices, b.topk(5, dim=-1).indices
        stats += torch.tensor(
            [
                (top5_a[:, 0] == y).sum().item(),
                (top5_b[:, 0] == y).sum().item(),
                (top5_a == y[:, None]).any(-1).sum().item(),
                (top5_b == y[:, None]).any(-1).sum().item(),
                (top5_a[:, 0] == top5_b[:, 0]).sum().item(),
                torch.nn.functional.kl_div(
                    b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum"
                ).item(),
            ],
            dtype=torch.float64,
        )
    n = len(images)
    return Comparison(n, *(float(s) / n for s in stats))
