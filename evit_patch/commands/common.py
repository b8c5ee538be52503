"""Arguments every command shares: which model, which weights, which EViT plan."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from ..weights import create_model

SHARED_WEIGHTS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "weights"


def add_model_arguments(parser: argparse.ArgumentParser, *, default_model: str = "deit_small_patch16_224") -> None:
    parser.add_argument("--model", default=default_model, help="timm model name (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="local weights: .safetensors or .pth")
    parser.add_argument("--pretrained", action="store_true", help="download pretrained weights through timm")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9], help="0-indexed blocks (default: 3 6 9)")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.7], help="keep rate, one or one per layer")
    parser.add_argument("--no-fuse", action="store_true", help="drop inattentive tokens instead of fusing them")


def keep_arg(args: argparse.Namespace) -> float | list[float]:
    return args.keep[0] if len(args.keep) == 1 else args.keep


def load_model(args: argparse.Namespace) -> nn.Module:
    """The original model in eval mode, from --checkpoint, --pretrained, or random init."""
    return create_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)
