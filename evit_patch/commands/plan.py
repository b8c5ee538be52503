"""``plan``: turn a budget into layers and keep rates, analytically or calibrated on images.

    evit-patch plan --model deit_tiny_patch16_224 --checkpoint w.safetensors --flops 0.66
    evit-patch plan ... --flops 0.66 --data val.csv sample.csv --calibration-images 128
    evit-patch plan ... --flops 1.0 --img-size 272        # same cost, higher resolution

With ``--data``, a seeded shuffle of the images is split: the first ``--calibration-images`` are
used to search, the rest to report agreement of the calibrated plan and of the analytic one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from timm.data import create_transform, resolve_data_config

import evit_patch

from ..bench.data import load_images
from ..bench.quality import compare
from ..errors import UsageError
from .common import (
    DEFAULT_MODEL,
    add_budget_arguments,
    add_plan_options,
    load_model,
    non_negative_int,
    plan_options,
    positive_int,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="timm model name (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="local weights: .safetensors or .pth")
    parser.add_argument("--pretrained", action="store_true", help="download pretrained weights through timm")
    add_budget_arguments(parser.add_mutually_exclusive_group(required=True))
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="default: D/4, D/2, 3D/4")
    parser.add_argument("--img-size", type=positive_int, default=None, help="plan for this input size")
    parser.add_argument("--data", type=Path, nargs="*", default=[], help="manifests/ImageFolders to calibrate on")
    parser.add_argument(
        "--calibration-images",
        type=non_negative_int,
        default=128,
        help="images the calibration uses, the rest check the plans (default: 128; 0: no calibration)",
    )
    parser.add_argument(
        "--max-evaluations", type=positive_int, default=200, help="calibration: most plans tried (default: 200)"
    )
    parser.add_argument("--seed", type=int, default=0, help="calibration image sample (default: 0)")
    parser.add_argument("--json", type=Path, default=None, help="write the plans here")
    add_plan_options(parser)


def run(args: argparse.Namespace) -> dict:
    model = load_model(args)
    budget = {"flops": args.flops, "speedup": args.speedup}
    options = plan_options(args)
    config = evit_patch.plan(model, layers=args.layers, img_size=args.img_size, **budget, **options)
    fast = evit_patch.apply(model, config.layers, config.keep, img_size=args.img_size, **options)
    report = evit_patch.explain(fast)
    print(report, end="\n\n")
    result: dict = {"analytic": config.to_dict(), "gmacs": report.macs_patched / 1e9}
    if args.data:
        result |= _held_out(args, model, fast, budget)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _images(paths, model, img_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    config = resolve_data_config({}, model=model)
    if img_size is not None:
        config["input_size"] = (config["input_size"][0], img_size, img_size)
    transform = create_transform(**config)
    sets = [load_images(path, transform) for path in paths]
    return torch.cat([s[0] for s in sets]), torch.cat([s[1] for s in sets])


def _held_out(args, model, fast, budget) -> dict:
    """Calibrate on a seeded subset (native size only); compare plans on the images left over."""
    images, labels = _images(args.data, model, args.img_size)
    native = images if args.img_size is None else _images(args.data, model)[0]
    if len(images) <= args.calibration_images:
        raise UsageError(
            f"--data holds {len(images)} images and --calibration-images is {args.calibration_images}: no image "
            f"would be left to check the plans on; give more images, or fewer calibration images (e.g. "
            f"--calibration-images {len(images) // 2})"
        )
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    calib, held = order[: args.calibration_images], order[args.calibration_images :]
    candidates = {"analytic": fast}
    result: dict = {}
    if args.img_size is None and len(calib):
        options = plan_options(args)
        found = evit_patch.calibrate(
            model, images[calib], layers=args.layers, max_evaluations=args.max_evaluations, **budget, **options
        )
        print(
            f"calibrated on {len(calib)} images ({found.evaluations} plans): {found.config.to_dict()}, "
            f"KL {found.baseline_kl:.4f} -> {found.kl:.4f}, agreement {100 * found.baseline_agreement:.1f} "
            f"-> {100 * found.agreement:.1f} %"
        )
        result["calibrated"] = found.config.to_dict()
        candidates["calibrated"] = evit_patch.apply(model, found.config.layers, found.config.keep, **options)
    for name, candidate in candidates.items():
        c = compare(model, candidate, images[held], labels[held], progress=False, original_images=native[held])
        print(
            f"{name:>10} on {c.images} held-out images: agreement {100 * c.agreement:.1f} %, top-1 "
            f"{100 * c.top1_original:.1f} -> {100 * c.top1_patched:.1f} %, "
            f"{evit_patch.explain(candidate).macs_patched / 1e9:.3f} GMACs"
        )
        result[f"{name}_held_out"] = vars(c)
    return result
