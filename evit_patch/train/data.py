"""Training images with seeded per-image augmentation, and a sampler whose position is resumable.

Sources: an ImageFolder tree (labels from folder names), a plain folder of images (unlabelled:
distillation only), or a ``file,label`` manifest CSV. An image is augmented with a seed derived
from ``(seed, epoch, index)`` alone, so the batches do not depend on the number of workers or
processes, and resuming needs only the epoch and the batch position.

Unreadable images are skipped with a warning that names the file: the next image in the list
takes its slot, so every batch keeps its size (DDP ranks must agree on shapes), and the skip is
counted in the log. Too many consecutive unreadable files mean a wrong path, and raise.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..bench.data import IMAGE_SUFFIXES, read_dataset, read_image_folder, read_manifest
from ..errors import UsageError
from ..families import find_family
from .loss import UNLABELLED

MAX_CONSECUTIVE_UNREADABLE = 16


def find_images(path: str | Path) -> tuple[list[tuple[Path, int]], bool]:
    """``(image path, label)`` pairs and whether they are labelled.

    A ``.csv`` is a manifest; a directory with sub-folders is an ImageFolder tree; a directory of
    image files is unlabelled (label ``UNLABELLED``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: expected an ImageFolder tree, a folder of images or a manifest .csv"
        )
    if path.is_file():
        if path.suffix != ".csv":
            raise UsageError(f"{path}: expected a manifest .csv (file,label) or a directory of images")
        return read_manifest(path), True
    if any(d.is_dir() and not d.name.startswith(".") for d in path.iterdir()):
        return read_image_folder(path), True
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{path} is empty: no sub-folders and no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    return [(p, UNLABELLED) for p in files], False


def check_labels(path: str | Path, items: list[tuple[Path, int]], num_classes: int) -> None:
    """Refuse labels that cannot be the model's classes (use ``--distill-only`` for those data).

    An ImageFolder tree whose folder names are not ImageNet wnids is labelled by sorted folder
    name, which only means something for a head trained on exactly those folders.
    """
    from timm.data import ImageNetInfo

    path = Path(path)
    top = max(label for _, label in items)
    if top >= num_classes:
        raise UsageError(
            f"{path}: label {top} is out of range for a model with {num_classes} classes; "
            "pass --distill-only to train without labels"
        )
    if path.is_dir():
        folders = {p.parent.name for p, _ in items}
        wnids = set(ImageNetInfo().label_names())
        if not folders <= wnids and len(folders) != num_classes:
            raise UsageError(
                f"{path}: {len(folders)} class folders that are not ImageNet wnids cannot label a model with "
                f"{num_classes} classes; pass --distill-only to train without labels"
            )


def data_config(model: nn.Module) -> dict:
    """timm's data config for ``model``, at the input size the model was built for."""
    config = resolve_data_config({}, model=model)
    config["input_size"] = (config["input_size"][0], *find_family(model).input_size(model))
    return config


def train_transform(model: nn.Module, augment: bool = True):
    """timm's training augmentation (random resized crop, flip, colour jitter), or its eval transform."""
    return create_transform(**data_config(model), is_training=augment)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 32-bit seed for one image of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class TrainImages(Dataset):
    """``(image, label, skipped)`` items; ``skipped`` counts unreadable files passed over for this slot."""

    def __init__(self, items: list[tuple[Path, int]], transform, *, seed: int = 0) -> None:
        self.items = items
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        for offset in range(MAX_CONSECUTIVE_UNREADABLE):
            path, label = self.items[(index + offset) % len(self.items)]
            try:
                with Image.open(path) as image:
                    rgb = image.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=1)
                continue
            return self._augment(rgb, index), label, offset
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_UNREADABLE} consecutive unreadable images from {self.items[index][0]}: "
            "is the data directory right?"
        )

    def _augment(self, image: Image.Image, index: int) -> torch.Tensor:
        """Run the random transform under a per-image seed, leaving the global RNGs as they were."""
        seed = sample_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return self.transform(image)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class ResumableBatches(Sampler):
    """One rank's batches of one epoch; ``set_epoch(epoch, start)`` skips batches already consumed.

    Each epoch is a permutation seeded by ``seed + epoch`` (as ``DistributedSampler``), cut to
    whole optimizer steps (``drop_last``), and dealt round-robin to ranks, so at every step the
    ranks' batches together are exactly the single-process batch of ``world_size x batch_size``.
    """

    def __init__(
        self, size: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, accum: int = 1
    ) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = size // (batch_size * world_size * accum)
        if self.steps_per_epoch == 0:
            raise UsageError(
                f"{size} images are fewer than one optimizer step takes: batch size {batch_size} x "
                f"{world_size} processes x {accum} accumulation steps = {batch_size * world_size * accum}"
            )
        self.batches_per_epoch = self.steps_per_epoch * accum
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[: self.batches_per_epoch * self.batch_size * self.world_size][self.rank :: self.world_size]
        for b in range(self.start, self.batches_per_epoch):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def train_loader(dataset: TrainImages, batches: ResumableBatches, *, workers: int = 0, pin_memory: bool = False):
    """A loader over ``batches``; call :func:`start_epoch` before iterating it.

    Its own generator feeds the worker base seed, which would otherwise be drawn from (and
    advance) the global RNG at every epoch start; the images are seeded per item anyway.
    """
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )


def start_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Point the dataset's augmentation seeds and the sampler at ``epoch``, from batch ``start``."""
    loader.dataset.epoch = epoch
    loader.batch_sampler.set_epoch(epoch, start)


def val_loader(path: str | Path, model: nn.Module, *, batch_size: int, workers: int = 0) -> DataLoader:
    """Labelled held-out images (ImageFolder tree or manifest) at timm's eval transform, in order.

    Decoded batch by batch, not cached as one tensor: an ImageNet val set would not fit in memory.
    """
    dataset = TrainImages(read_dataset(path), create_transform(**data_config(model)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
