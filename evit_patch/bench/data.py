"""Labelled image manifests (``file,label`` CSV) decoded once into cached tensors.

Decoding JPEGs dominates evaluation on a small CPU, so decoded batches are cached on disk,
keyed by the manifest, the files' sizes and the transform.
"""

from __future__ import annotations

import csv
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ..errors import UsageError


def default_cache_dir() -> Path:
    return Path(os.environ.get("EVIT_PATCH_CACHE", Path.home() / ".cache" / "evit_patch"))


def read_manifest(csv_path: str | Path) -> list[tuple[Path, int]]:
    """``(image path, label)`` pairs from a ``file,label`` CSV.

    Relative paths are read against a folder named like the CSV when there is one (the layout of
    ``../shared/data/images``: ``imagenet_val.csv`` beside ``imagenet_val/``), else against the
    CSV's own folder; absolute paths are taken as they are.
    """
    csv_path = Path(csv_path)
    root = csv_path.with_suffix("") if csv_path.with_suffix("").is_dir() else csv_path.parent
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "file" not in rows[0] or "label" not in rows[0]:
        raise UsageError(f"{csv_path}: expected a CSV with 'file' and 'label' columns")
    return [(root / r["file"], int(r["label"])) for r in rows]


def read_class_names(csv_path: str | Path) -> list[str]:
    """Class names in index order from an ``index,...,name`` CSV (``../shared/data/labels/imagenet1k_classes.csv``),
    each the first of its comma-separated synonyms (``"tench, Tinca tinca"`` -> ``"tench"``): zero-shot prompts."""
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "index" not in rows[0] or "name" not in rows[0]:
        raise UsageError(f"{csv_path}: expected a CSV with 'index' and 'name' columns")
    names = {int(r["index"]): r["name"].split(",")[0].strip() for r in rows}
    if sorted(names) != list(range(len(names))):
        raise UsageError(f"{csv_path}: expected indices 0..{len(names) - 1}, each once")
    return [names[i] for i in range(len(names))]


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def read_image_folder(root: str | Path) -> list[tuple[Path, int]]:
    """``(image path, label)`` pairs from an ImageFolder tree (one sub-folder per class).

    Folders named by ImageNet wnids get timm's ImageNet-1k index, so a subset of ImageNet is
    labelled correctly; other trees are labelled by sorted folder name.
    """
    from timm.data import ImageNetInfo

    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not classes:
        raise UsageError(f"{root}: expected an ImageFolder tree (one sub-folder per class), found no sub-folders")
    wnids = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    index = (
        {c: wnids[c] for c in classes} if all(c in wnids for c in classes) else {c: i for i, c in enumerate(classes)}
    )
    items = [(p, index[c]) for c in classes for p in sorted((root / c).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise UsageError(f"{root}: the class folders hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def read_dataset(path: str | Path) -> list[tuple[Path, int]]:
    """A manifest CSV or an ImageFolder tree."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: expected a manifest .csv or an ImageFolder directory")
    return read_manifest(path) if path.suffix == ".csv" else read_image_folder(path)


def load_images(
    csv_path: str | Path,
    transform,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of a manifest CSV or ImageFolder tree; returns ``(images, labels)``."""
    items = read_dataset(csv_path)
    key = hashlib.sha256(
        repr(
            (str(Path(csv_path).resolve()), [(p.name, p.stat().st_size, y) for p, y in items], repr(transform))
        ).encode()
    ).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / f"{Path(csv_path).stem}-{key}.pt"  # one file per set and transform
    if cached.is_file():
        data = torch.load(cached, weights_only=True)
        return data["images"], data["labels"]

    def decode(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            return transform(image.convert("RGB"))

    # Pillow releases the GIL while decoding and resizing: one thread per core decodes in parallel.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(decode, [p for p, _ in items])
        images = torch.stack(
            list(tqdm(decoded, total=len(items), desc=f"decoding {Path(csv_path).name}", disable=not progress))
        )
    labels = torch.tensor([y for _, y in items])
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")  # concurrent test workers each write their own
    torch.save({"images": images, "labels": labels}, tmp)
    os.replace(tmp, cached)
    return images, labels
