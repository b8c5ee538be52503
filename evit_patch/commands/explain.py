"""``explain``: tokens per block and analytic GMACs of a patched model, before and after.

    evit-patch explain --model deit_tiny_patch16_224 --layers 3 6 9 --keep 0.7
    evit-patch explain --load ./deit-tiny-evit          # a save_pretrained directory or Hub repo id

Random-init weights are enough: the cost depends on the architecture and the plan alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import evit_patch

from .common import add_load_argument, add_model_arguments, patched_model, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_load_argument(parser)
    parser.add_argument("--img-size", type=positive_int, default=None, help="explain at this square input size")
    parser.add_argument("--json", type=Path, default=None, help="write the per-block rows here")


def run(args: argparse.Namespace) -> evit_patch.Explanation:
    if args.load:
        report = evit_patch.explain(patched_model(args), img_size=args.img_size)
    else:
        report = evit_patch.explain(patched_model(args, img_size=args.img_size))
    print(report)
    if args.json:
        rows = [vars(row) for row in report.rows]
        summary = {"gmacs_original": report.macs_original / 1e9, "gmacs_patched": report.macs_patched / 1e9}
        args.json.write_text(json.dumps({"model": report.model, **summary, "blocks": rows}, indent=2))
    return report
