"""evit-patch: EViT token reorganization for pretrained vision transformers, from the command line.

    evit-patch explain --model deit_tiny_patch16_224 --layers 3 6 9 --keep 0.7
    evit-patch export --model deit_tiny_patch16_224 --pretrained --format onnx --output deit_tiny_evit.onnx --verify
    evit-patch COMMAND --help                     # the options of one command

--model takes a timm name: weights come from --checkpoint (a local file) or --pretrained (the
hub), else the model is randomly initialised, which is enough for explain and for timing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from .errors import EViTError

# Each command is a module of evit_patch.commands with add_arguments(parser) and run(args); the same
# modules back tools/*.py, so the CLI adds no logic of its own.
COMMANDS = ("explain", "export", "benchmark", "evaluate", "plan", "visualize", "finetune")
"""Subcommands in --help order, each a module of evit_patch.commands; register one (finetune) by adding its name."""

USER_ERRORS = (EViTError, FileNotFoundError, FileExistsError, ImportError)
"""Errors reported as one line (``evit-patch CMD: error: ...``, exit 2) rather than a traceback."""


def _summary(module: ModuleType) -> str:
    """The first docstring line without its ````name``: ```` prefix: the one-line help of a command."""
    first = (module.__doc__ or "").strip().splitlines()[0]
    return first.split(": ", 1)[1] if first.startswith("``") and ": " in first else first


def build_parser(commands: tuple[str, ...] = COMMANDS) -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="evit-patch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in commands:
        module = importlib.import_module(f"{__package__}.commands.{name}")
        sub = subparsers.add_parser(
            name,
            help=_summary(module),
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``evit-patch`` console script and ``python -m evit_patch``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # which flags were given (finetune --resume)
    try:
        args.run(args)
    except USER_ERRORS as exc:
        print(f"evit-patch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
