"""``visualize``: draw which patches EViT keeps in real images, block by block.

    evit-patch visualize --image a.jpg b.jpg --output kept.png
    evit-patch visualize --image a.jpg --layers 3 6 9 --keep 0.5 --img-size 320 --output kept.png

Weights: --checkpoint, else the hub with --pretrained, else ../shared/data/weights/<model>.safetensors
when present, else random init (as in the other commands). Several images are drawn as one batch,
two rows each.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import evit_patch

from ..deploy.weights import create_model
from ..errors import UsageError
from .common import DEFAULT_MODEL, add_method_argument, data_dir, positive_int

SHARED = data_dir()


def class_names(path: Path) -> list[str] | None:
    """First name of each class from an ``index,wnid,name`` CSV, or None if there is none."""
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return [row["name"].split(",")[0] for row in csv.DictReader(fh)]


def load_model(name: str, checkpoint: Path | None, pretrained: bool, data_dir: Path, img_size: int | None):
    local = data_dir / "weights" / f"{name}.safetensors"
    if checkpoint is None and not pretrained and local.is_file():
        checkpoint = local
    # A dynamic-size model resamples its position embedding at run time, so the same weights
    # serve any --img-size.
    kwargs = {"dynamic_img_size": True} if img_size is not None else {}
    if checkpoint is None and not pretrained:
        print(f"{name}: random-init weights (no --checkpoint, no {local}; --pretrained downloads them)")
    return create_model(name, checkpoint=checkpoint, pretrained=pretrained, **kwargs)


def figure(model, paths: list[Path], *, layers, keep, img_size=None, names=None, panel=160, **options) -> Image.Image:
    """Patch ``model`` (``options``: as for ``evit_patch.apply``) and draw the figure for the images at ``paths``."""
    config = resolve_data_config({}, model=model)
    if img_size is not None:
        config = {**config, "input_size": (3, img_size, img_size), "crop_pct": 1.0}
    transform = create_transform(**config)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    fast = evit_patch.apply(model, layers=layers, keep=keep, **options)
    return evit_patch.visualize(fast, x, class_names=names, mean=config["mean"], std=config["std"], panel=panel)


def save_png(image: Image.Image, path: Path, colours: int | None = None) -> int:
    """Write atomically (temp name, then rename); ``colours`` quantizes to a palette. Returns bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if colours is not None:
        image = image.quantize(colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path.stat().st_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="timm model name (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="local weights (.safetensors or .pth)")
    parser.add_argument("--pretrained", action="store_true", help="download weights through timm")
    parser.add_argument("--image", type=Path, nargs="+", required=True, help="one or more images (one batch)")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9], help="0-indexed blocks (default: 3 6 9)")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.7], help="one rate, or one per layer")
    parser.add_argument("--no-fuse", action="store_true", help="drop inattentive tokens instead of fusing them")
    add_method_argument(parser)
    parser.add_argument("--img-size", type=positive_int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--panel", type=positive_int, default=224, help="panel size in pixels")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=SHARED,
        help="folder with weights/ and labels/ (default: $EVIT_PATCH_DATA, else ../shared/data)",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("evit_kept.png"), help="PNG to write (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> Path:
    missing = [str(p) for p in args.image if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image not found: {', '.join(missing)}")
    for path in args.image:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise UsageError(f"--image {path}: not an image PIL can read ({exc})") from exc
    model = load_model(args.model, args.checkpoint, args.pretrained, args.data_dir, args.img_size)
    keep = args.keep[0] if len(args.keep) == 1 else args.keep
    names = class_names(args.data_dir / "labels" / "imagenet1k_classes.csv")
    image = figure(
        model,
        args.image,
        layers=args.layers,
        keep=keep,
        fuse=not args.no_fuse,
        method=args.method,
        img_size=args.img_size,
        names=names if model.num_classes == 1000 else None,
        panel=args.panel,
    )
    size = save_png(image, args.output)
    print(f"wrote {args.output} ({image.width}x{image.height}, {size / 1024:.0f} KiB)")
    return args.output
