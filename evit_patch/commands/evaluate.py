"""``evaluate``: top-1/top-5 of the original and the patched model, agreement and KL between them.

    evit-patch evaluate --model deit_tiny_patch16_224 --checkpoint w.safetensors \\
        --data ../shared/data/images/imagenet_val.csv --keep 0.9 0.7 0.5 --sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from timm.data import create_transform, resolve_data_config

import evit_patch

from ..bench.data import load_images
from ..bench.quality import compare
from .common import add_model_arguments, load_model, plan_options, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="manifest CSVs or ImageFolder dirs")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward (default: 64)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="evaluate each --keep value separately, at every layer (without it, several --keep values are "
        "one plan: one rate per --layers entry)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def run(args: argparse.Namespace) -> list[dict]:
    model = load_model(args)
    transform = create_transform(**resolve_data_config({}, model=model))
    sets = {str(path): load_images(path, transform) for path in args.data}
    keeps = [[k] for k in args.keep] if args.sweep else [args.keep]
    results = []
    for keep in keeps:
        fast = evit_patch.apply(
            model,
            layers=args.layers,
            keep=keep[0] if len(keep) == 1 else keep,
            **plan_options(args),
        )
        gmacs = evit_patch.explain(fast).macs_patched / 1e9
        for name, (images, labels) in sets.items():
            c = compare(model, fast, images, labels, batch_size=args.batch_size)
            row = {"model": args.model, "layers": args.layers, "keep": keep, "data": name, "gmacs": gmacs, **vars(c)}
            results.append(row)
            print(
                f"{Path(name).name} ({c.images} images) keep {keep}: top-1 {100 * c.top1_original:.1f} -> "
                f"{100 * c.top1_patched:.1f} %, top-5 {100 * c.top5_original:.1f} -> {100 * c.top5_patched:.1f} %, "
                f"agreement {100 * c.agreement:.1f} %, mean KL {c.mean_kl:.4f}, {gmacs:.3f} GMACs"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results
