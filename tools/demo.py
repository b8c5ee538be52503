"""Demo: patch a genuine pretrained DeiT-Tiny, explain it, time it, and check it on real images;
then the training-free choice at the same MACs (``method="merge"``) beside it.

    python tools/demo.py                       # offline: ../shared/data weights and images
    python tools/demo.py --model deit_small_patch16_224 --pretrained   # weights from the hub

With ``--pretrained`` (or without ../shared/data) weights come from the Hugging Face hub via timm.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timm.data import create_transform, resolve_data_config

import evit_patch
from evit_patch.bench.data import load_images
from evit_patch.bench.quality import compare
from evit_patch.bench.speed import compare_speed
from evit_patch.deploy.weights import create_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--checkpoint", type=Path, default=None, help="local weights (.safetensors or .pth)")
    parser.add_argument("--pretrained", action="store_true", help="download weights through timm")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--batch-size", type=int, default=16, help="batch size for timing")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=SHARED, help="folder with weights/ and images/")
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint
    local = args.data_dir / "weights" / f"{args.model}.safetensors"
    if checkpoint is None and not args.pretrained and local.is_file():
        checkpoint = local
    source = checkpoint or "the Hugging Face hub (timm pretrained=True)"
    print(f"Loading {args.model} from {source}")
    model = create_model(args.model, checkpoint=checkpoint, pretrained=checkpoint is None)

    fast = evit_patch.apply(model, layers=args.layers, keep=args.keep)
    report = evit_patch.explain(fast)
    print(report, end="\n\n")

    x = torch.randn(args.batch_size, *resolve_data_config({}, model=model)["input_size"])
    speed = compare_speed(model, fast, x, rounds=args.rounds)
    print(
        f"Eager CPU speed, batch {speed.batch_size}, {torch.get_num_threads()} threads: "
        f"{speed.throughput(False):.1f} -> {speed.throughput(True):.1f} img/s, "
        f"speedup {speed.speedup:.2f}x (rounds {speed.speedup_spread[0]:.2f}-{speed.speedup_spread[1]:.2f}), "
        f"FLOP ideal {report.ideal_speedup:.2f}x, efficiency {speed.speedup / report.ideal_speedup:.2f}\n"
    )

    fraction = report.macs_patched / report.macs_original
    merged = evit_patch.apply(model, flops=fraction, method="merge")
    print(f"Without fine-tuning, the same budget merged (apply(model, flops={fraction:.3f}, method='merge')):")
    print(evit_patch.explain(merged), end="\n\n")

    transform = create_transform(**resolve_data_config({}, model=model))
    for manifest in ("imagenet_val", "imagenet_sample"):
        path = args.data_dir / "images" / f"{manifest}.csv"
        if not path.is_file():
            print(f"{path} not found: skipping accuracy")
            continue
        images, labels = load_images(path, transform)
        for name, patched in (("EViT", fast), ("merge", merged)):
            c = compare(model, patched, images, labels, progress=False)
            print(
                f"{manifest} ({c.images} real images), {name:>5}: top-1 {100 * c.top1_original:.1f} % -> "
                f"{100 * c.top1_patched:.1f} %, agreement with the original {100 * c.agreement:.1f} %, "
                f"mean KL {c.mean_kl:.3f}"
            )


if __name__ == "__main__":
    main()
