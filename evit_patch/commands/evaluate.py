"""``evaluate``: top-1/top-5 of the original and the patched model, agreement and KL between them;
for embedding models (``open_clip:ARCH``, timm with ``num_classes=0``), the cosine similarity of the
embeddings and, with a text tower, zero-shot agreement and accuracy.

    evit-patch evaluate --model deit_tiny_patch16_224 --checkpoint w.safetensors \\
        --data ../shared/data/images/imagenet_val.csv --keep 0.9 0.7 0.5 --sweep
    evit-patch evaluate --model open_clip:ViT-B-32 --checkpoint open_clip_model.safetensors \\
        --data ../shared/data/images/imagenet_val.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from timm.data import create_transform, resolve_data_config

import evit_patch

from ..bench.data import load_images, read_class_names
from ..bench.quality import compare, compare_embeddings, is_embedding_model, zero_shot_classes
from ..errors import UsageError
from .common import (
    OPEN_CLIP,
    add_model_arguments,
    budget_arguments,
    data_dir,
    load_model,
    load_open_clip,
    plan_options,
    positive_int,
)


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
    parser.add_argument(
        "--classes",
        type=Path,
        default=data_dir() / "labels" / "imagenet1k_classes.csv",
        help="index,name CSV of the labels' class names, for zero-shot with an open_clip text tower "
        "(default: $EVIT_PATCH_DATA/labels/imagenet1k_classes.csv, EVIT_PATCH_DATA defaulting to ../shared/data)",
    )
    parser.add_argument(
        "--template", default="a photo of a {}.", help="zero-shot prompt per class name (default: %(default)r)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def _model_and_classes(args: argparse.Namespace):
    """``(model, transform, class embeddings or None)``: open_clip brings its own preprocessing and text tower."""
    if not args.model.startswith(OPEN_CLIP):
        model = load_model(args)
        return model, create_transform(**resolve_data_config({}, model=model)), None
    clip, preprocess, tokenizer = load_open_clip(args)
    names = read_class_names(args.classes)
    device = next(clip.parameters()).device
    classes = zero_shot_classes(lambda texts: clip.encode_text(tokenizer(texts).to(device)), names, args.template)
    return clip.visual, preprocess, classes


def run(args: argparse.Namespace) -> list[dict]:
    budget = budget_arguments(args)
    if budget and args.sweep:
        raise UsageError("--sweep evaluates each --keep value; with --flops/--speedup there is one plan: drop --sweep")
    model, transform, classes = _model_and_classes(args)
    sets = {str(path): load_images(path, transform) for path in args.data}
    keeps = [[k] for k in args.keep] if args.sweep else [args.keep]
    results = []
    for keep in [None] if budget else keeps:
        amount = budget if budget else {"keep": keep[0] if len(keep) == 1 else keep}
        fast = evit_patch.apply(model, layers=args.layers, **amount, **plan_options(args))
        gmacs = evit_patch.explain(fast).macs_patched / 1e9
        label = f"keep {keep}"
        if budget:  # the plan's keep rates, as a budget chose them
            keep = list(evit_patch.get_config(fast).keep)
            label = f"{' '.join(f'{k} {v}' for k, v in budget.items())} (keep {keep[0]:.4g})"
        for name, (images, labels) in sets.items():
            head = f"{Path(name).name} ({len(images)} images) {label}:"
            if _embeds(model, images):
                c = compare_embeddings(model, fast, images, labels, classes=classes, batch_size=args.batch_size)
                line = f"{head} embedding cosine mean {c.mean_cosine:.4f}, min {c.min_cosine:.4f}"
                if c.zero_shot_agreement is not None:
                    line += (
                        f", zero-shot top-1 {100 * c.top1_original:.1f} -> {100 * c.top1_patched:.1f} %, "
                        f"agreement {100 * c.zero_shot_agreement:.1f} %"
                    )
            else:
                c = compare(model, fast, images, labels, batch_size=args.batch_size)
                line = (
                    f"{head} top-1 {100 * c.top1_original:.1f} -> {100 * c.top1_patched:.1f} %, top-5 "
                    f"{100 * c.top5_original:.1f} -> {100 * c.top5_patched:.1f} %, "
                    f"agreement {100 * c.agreement:.1f} %, mean KL {c.mean_kl:.4f}"
                )
            layers = list(evit_patch.get_config(fast).layers) if budget else args.layers
            row = {
                "model": args.model,
                "layers": layers,
                "keep": keep,
                "data": name,
                "gmacs": gmacs,
                **budget,
                **vars(c),
            }
            results.append(row)
            print(f"{line}, {gmacs:.3f} GMACs")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _embeds(model, images) -> bool:
    """Whether ``model`` outputs an embedding (no classifier head), from one image."""
    with torch.inference_mode():
        return is_embedding_model(model, model(images[:1].to(next(model.parameters()).device)))
