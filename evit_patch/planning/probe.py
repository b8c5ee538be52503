"""Synthetic probe images for data-free planning: dead leaves.

A dead-leaves image is a stack of opaque, randomly coloured discs whose radii follow ``p(r) ~ r^-3``:
the scale-invariant occlusion model of natural images (flat regions bounded by edges at every
scale; Lee, Mumford and Huang, 2001). A model's sensitivity to where tokens are reduced, measured on
such images, ranks schedules as it does on real photographs (measured on DeiT-Tiny; 1/f noise ranks
them one block late), and no data set is needed, so ``apply(model, flops=...)`` stays one call.
"""

from __future__ import annotations

import torch
from torch import Tensor

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dead_leaves(count: int, size: tuple[int, int], channels: int = 3, *, discs: int = 400, seed: int = 0) -> Tensor:
    """``(count, channels, H, W)`` dead-leaves images in ``[0, 1]``, deterministic for a ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    r_min, r_max = 2.0, max(height, width) / 2
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    images = torch.empty(count, channels, height, width)
    for index in range(count):
        u = torch.rand(discs, generator=generator)
        radius = 1.0 / torch.sqrt(1.0 / r_min**2 - u * (1.0 / r_min**2 - 1.0 / r_max**2))  # p(r) ~ r^-3
        centre = torch.rand(discs, 2, generator=generator) * torch.tensor([height, width])
        colours = torch.rand(discs + 1, channels, generator=generator)  # row 0: the background
        distance = (rows - centre[:, 0, None, None]) ** 2 + (cols - centre[:, 1, None, None]) ** 2
        covered = distance < radius[:, None, None] ** 2
        order = torch.arange(1, discs + 1, dtype=torch.int16)[:, None, None]
        top = (covered * order).amax(0).long()  # the last disc drawn wins; 0: background
        images[index] = colours[top].permute(2, 0, 1)
    return images


def probe_images(model, size: tuple[int, int], channels: int, count: int = 24, seed: int = 0) -> Tensor:
    """Dead-leaves images normalised as ``model`` expects (timm's ``pretrained_cfg`` mean and std, else
    ImageNet's), in the dtype and on the device of its parameters."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    if len(mean) != channels:
        mean, std = (0.5,) * channels, (0.5,) * channels
    images = dead_leaves(count, size, channels, seed=seed)
    images = (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    param = next(model.parameters())
    return images.to(device=param.device, dtype=param.dtype)
