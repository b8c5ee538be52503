"""Regenerate the figures in docs/images/ from the genuine DeiT-Tiny and real ImageNet images.

    python tools/make_docs_figures.py            # needs ../shared/data (weights, images, labels)

Each PNG is quantized to a palette so it stays under 200 KB in the repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evit_patch.commands.visualize import SHARED, class_names, figure, load_model, save_png

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 200_000
# (file, images from imagenet_val, keep, input size): chosen for a clear object on a busy background.
FIGURES = [
    ("kept-tokens.png", ["ILSVRC2012_val_00000025", "ILSVRC2012_val_00000043"], 0.7, None),
    ("kept-tokens-keep05.png", ["ILSVRC2012_val_00000077"], 0.5, None),
    ("kept-tokens-320px.png", ["ILSVRC2012_val_00000023"], 0.7, 320),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)

    names = class_names(args.data_dir / "labels" / "imagenet1k_classes.csv")
    folder = args.data_dir / "images" / "imagenet_val"
    for file, stems, keep, img_size in FIGURES:
        model = load_model("deit_tiny_patch16_224", None, False, args.data_dir, img_size)
        paths = [folder / f"{stem}.JPEG" for stem in stems]
        image = figure(model, paths, layers=[3, 6, 9], keep=keep, img_size=img_size, names=names, panel=168)
        size = save_png(image, args.output / file, colours=256)
        print(f"{file}: {image.width}x{image.height}, {size / 1000:.0f} KB")
        if size > MAX_BYTES:
            raise SystemExit(f"{file} is {size} bytes; keep docs figures under {MAX_BYTES}")


if __name__ == "__main__":
    main()
