"""Arguments every command shares: which model, which weights, which EViT plan."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from ..options import Method, Score
from ..weights import create_model

SHARED_WEIGHTS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "weights"


def add_model_arguments(parser: argparse.ArgumentParser, *, default_model: str = "deit_small_patch16_224") -> None:
    parser.add_argument("--model", default=default_model, help="timm model name (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="local weights: .safetensors or .pth")
    parser.add_argument("--pretrained", action="store_true", help="download pretrained weights through timm")
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="0-indexed blocks (default: D/4, D/2, 3D/4, i.e. 3 6 9 of 12; with --method merge and a "
        "budget, every block from D/4 on)",
    )
    parser.add_argument("--keep", type=float, nargs="+", default=[0.7], help="keep rate, one or one per layer")
    add_plan_options(parser)


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    """``--no-fuse``, ``--score``, ``--method``, ``--proportional``: read back by :func:`plan_options`."""
    parser.add_argument("--no-fuse", action="store_true", help="drop inattentive tokens instead of fusing them")
    parser.add_argument(
        "--score",
        choices=[s.value for s in Score],
        default=None,
        help="rank tokens by [CLS] attention or by attention received (default: cls where there is a class token)",
    )
    parser.add_argument(
        "--method",
        choices=[m.value for m in Method],
        default=Method.EVIT.value,
        help="what becomes of the tokens not kept: evit (fused into one token, the paper) or merge "
        "(averaged into the most similar kept token; best without fine-tuning) (default: %(default)s)",
    )
    parser.add_argument(
        "--proportional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add log(size) to later attention logits (default: on for merge, off for evit)",
    )


def plan_options(args: argparse.Namespace) -> dict:
    """The plan options other than layers and keep, as ``evit_patch.apply`` takes them."""
    return {
        "fuse": not args.no_fuse,
        "score": args.score,
        "method": args.method,
        "proportional": args.proportional,
    }


def keep_arg(args: argparse.Namespace) -> float | list[float]:
    return args.keep[0] if len(args.keep) == 1 else args.keep


def load_model(args: argparse.Namespace) -> nn.Module:
    """The original model in eval mode, from --checkpoint, --pretrained, or random init."""
    return create_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)


def add_load_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--load",
        default=None,
        metavar="DIR_OR_REPO",
        help="a save_pretrained directory or Hub repo id; replaces --model, weights and plan options",
    )


def patched_model(args: argparse.Namespace, **apply_kwargs) -> nn.Module:
    """The patched model in eval mode: ``--load`` as saved, else ``--model`` patched with the plan options."""
    import evit_patch

    if getattr(args, "load", None):
        return evit_patch.load_pretrained(args.load)
    fast = evit_patch.apply(
        load_model(args),
        layers=args.layers,
        keep=keep_arg(args),
        **plan_options(args),
        **apply_kwargs,
    )
    return fast.eval()
