"""Arguments every command shares: which model, which weights, which EViT plan."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

from ..config import PlanOptions
from ..deploy.weights import check_fits, create_model, load_state_dict
from ..errors import UsageError
from ..options import Method, Score
from ..reductions import list_reductions


def data_dir() -> Path:
    """Default folder with ``weights/``, ``images/`` and ``labels/`` for the commands that read
    example material: ``$EVIT_PATCH_DATA``, else ``../shared/data`` from the working directory
    (where the repository's test data sits beside a checkout)."""
    return Path(os.environ.get("EVIT_PATCH_DATA", Path("..") / "shared" / "data"))


DEFAULT_MODEL = "deit_tiny_patch16_224"
"""Every command's default ``--model``: the model whose genuine weights the tests and demo use."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="timm model name; open_clip:ARCH for an open_clip CLIP's vision tower; torchvision:NAME; "
        "transformers:DIR for a local transformers model folder (default: %(default)s)",
    )
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
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--keep", type=float, nargs="+", default=[0.7], help="keep rate, one or one per layer")
    add_budget_arguments(amount)
    add_plan_options(parser)


def add_budget_arguments(group: argparse._ActionsContainer) -> None:
    """``--flops`` and ``--speedup``, the budgets ``evit_patch.plan`` turns into keep rates; add them to a
    mutually exclusive group (with ``--keep``, or required for ``plan``). Read back by :func:`plan_arguments`."""
    group.add_argument(
        "--flops",
        type=float,
        default=None,
        help="MAC budget, a fraction of the original's MACs, e.g. 0.65: the planner picks the keep rate (with "
        "--method merge and no --layers, every block from D/4 on)",
    )
    group.add_argument(
        "--speedup", type=float, default=None, help="FLOP-ideal speedup budget, e.g. 1.5 (= --flops 1/1.5)"
    )


def budget_arguments(args: argparse.Namespace) -> dict:
    """The budget given (``{"flops": 0.45}``, ``{"speedup": 1.5}``), or ``{}``."""
    return {name: getattr(args, name) for name in ("flops", "speedup") if getattr(args, name, None) is not None}


def plan_arguments(args: argparse.Namespace) -> dict:
    """``layers`` and ``keep``, or ``layers`` and the budget, as ``evit_patch.apply`` takes them."""
    budget = budget_arguments(args)
    return {"layers": args.layers, **budget} if budget else {"layers": args.layers, "keep": keep_arg(args)}


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    """``--no-fuse``, ``--score``, ``--method``, ``--proportional``, ``--dense``: read back by :func:`plan_options`."""
    parser.add_argument("--no-fuse", action="store_true", help="drop inattentive tokens instead of fusing them")
    parser.add_argument(
        "--score",
        choices=[s.value for s in Score],
        default=None,
        help="rank tokens by [CLS] attention or by attention received (default: cls where there is a class token)",
    )
    add_method_argument(parser)
    parser.add_argument(
        "--proportional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add log(size) to later attention logits (default: on for merge, off for evit)",
    )
    parser.add_argument(
        "--dense",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="carry which token stands for each patch, so block outputs restore to the full patch grid "
        "(forward_intermediates, hidden states, backbone feature maps; default: on for backbones)",
    )


def add_method_argument(parser: argparse.ArgumentParser) -> None:
    """``--method``, one of the registered reductions."""
    parser.add_argument(
        "--method",
        choices=list_reductions(),
        default=Method.EVIT.value,
        help="what becomes of the tokens not kept: evit (fused into one token, the paper), merge "
        "(averaged into the most similar kept token; best without fine-tuning), or another registered "
        "reduction (default: %(default)s)",
    )


def plan_options(args: argparse.Namespace) -> dict:
    """The plan options other than layers and keep, validated as one
    :class:`~evit_patch.options.PlanOptions`, as ``evit_patch.apply`` takes them."""
    options = PlanOptions.build(
        method=args.method,
        fuse=not getattr(args, "no_fuse", False),
        score=getattr(args, "score", None),
        proportional=getattr(args, "proportional", None),
        dense=getattr(args, "dense", None),
        where=f"--method {args.method}",
    )
    return options.as_kwargs()


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a batch size, an image size, a number of rounds)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0 (warm-up rounds)."""
    return _int_at_least(text, 0, "an integer of at least 0")


def device(text: str) -> str:
    """argparse type: a torch device this machine has."""
    try:
        parsed = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({exc})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch.cuda.is_available() is False on this machine; use cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use cpu")
    return text


def keep_arg(args: argparse.Namespace) -> float | list[float]:
    return args.keep[0] if len(args.keep) == 1 else args.keep


OPEN_CLIP = "open_clip:"
"""``--model`` prefix naming an open_clip architecture (``open_clip:ViT-B-32``) instead of a timm model."""
TORCHVISION = "torchvision:"
"""``--model`` prefix naming a torchvision model (``torchvision:vit_b_16``)."""
TRANSFORMERS = "transformers:"
"""``--model`` prefix naming a local transformers model directory (``transformers:./vit-base``)."""


def load_model(args: argparse.Namespace) -> nn.Module:
    """The original model in eval mode, from --checkpoint, --pretrained, or random init; for
    ``open_clip:ARCH``, the CLIP model's vision tower; ``torchvision:NAME`` and
    ``transformers:DIR`` (a ``save_pretrained`` folder, read offline) from those libraries."""
    if args.model.startswith(OPEN_CLIP):
        return load_open_clip(args)[0].visual
    if args.model.startswith(TORCHVISION):
        return _load_torchvision(args)
    if args.model.startswith(TRANSFORMERS):
        return _load_transformers(args)
    return create_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)


def _load_torchvision(args: argparse.Namespace) -> nn.Module:
    import torchvision

    name = args.model[len(TORCHVISION) :]
    if name not in torchvision.models.list_models():
        raise UsageError(f"torchvision has no model named {name!r}; see torchvision.models.list_models()")
    model = torchvision.models.get_model(name, weights="DEFAULT" if args.pretrained else None)
    if args.checkpoint is not None:
        state = load_state_dict(args.checkpoint)
        check_fits(model, state, f"{args.checkpoint}: weights do not fit torchvision model {name!r}")
        model.load_state_dict(state, strict=True)
    return model.eval()


def _load_transformers(args: argparse.Namespace) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise UsageError(f'--model {args.model} needs transformers: pip install "evit_patch[hf]"') from exc
    path = Path(args.model[len(TRANSFORMERS) :])
    if args.checkpoint is not None or args.pretrained:
        raise UsageError(f"--model {args.model}: the folder holds the weights; drop --checkpoint and --pretrained")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {args.model}: expected a folder written by transformers' save_pretrained")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    architecture = (config.architectures or ["AutoModel"])[0]
    cls = getattr(transformers, architecture, transformers.AutoModel)
    return cls.from_pretrained(path, local_files_only=True).eval()


def load_open_clip(args: argparse.Namespace) -> tuple[nn.Module, object, object]:
    """``(model, preprocess, tokenizer)`` for ``--model open_clip:ARCH``: random init, or the weights
    file given as --checkpoint, loaded by open_clip itself."""
    try:
        import open_clip
    except ImportError as exc:
        raise UsageError(f'--model {args.model} needs open_clip: pip install "evit_patch[open_clip]"') from exc
    arch = args.model[len(OPEN_CLIP) :]
    if arch not in open_clip.list_models():
        raise UsageError(f"open_clip has no model named {arch!r}; see open_clip.list_models()")
    if args.pretrained:
        raise UsageError(f"--model {args.model}: give open_clip's weights file as --checkpoint, not --pretrained")
    checkpoint = None if args.checkpoint is None else str(args.checkpoint)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint)
    return model.eval(), preprocess, open_clip.get_tokenizer(arch)


_REPLACED_BY_LOAD = (
    *("model", "checkpoint", "pretrained"),
    *("layers", "keep", "flops", "speedup", "no_fuse", "score", "method", "proportional"),
)
"""Options ``--load`` replaces: the saved model brings its architecture, weights and plan."""


def add_load_argument(parser: argparse.ArgumentParser) -> None:
    """``--load``; call after :func:`add_model_arguments` (it records their flags and defaults to spot conflicts)."""
    parser.add_argument(
        "--load",
        default=None,
        metavar="DIR_OR_REPO",
        help="a save_pretrained directory or Hub repo id; replaces --model, weights and plan options",
    )
    flags = {a.dest: a.option_strings for a in parser._actions if a.dest in _REPLACED_BY_LOAD}
    parser.set_defaults(
        model_defaults={dest: parser.get_default(dest) for dest in _REPLACED_BY_LOAD}, model_flags=flags
    )


def given_flags(argv: list[str], flags: dict[str, list[str]]) -> set[str]:
    """The destinations among ``flags`` (destination -> option strings) that ``argv`` gives, at any value,
    as argparse reads them (``--model=x``, unambiguous abbreviations)."""
    parser = argparse.ArgumentParser(add_help=False)
    for dest, options in flags.items():
        parser.add_argument(*options, dest=dest, action="store_true", default=argparse.SUPPRESS)
    known, _ = parser.parse_known_args(argv)
    return set(vars(known))


def check_load_conflicts(args: argparse.Namespace) -> None:
    """Refuse ``--load`` together with an option it replaces (it would be ignored without a word). With
    ``args.argv`` (set by the CLI) a flag given at its default value counts too; without, only values
    that differ from the defaults can be seen."""
    defaults, flags = getattr(args, "model_defaults", {}), getattr(args, "model_flags", {})
    argv = getattr(args, "argv", None)
    if argv is not None and flags:
        named = given_flags(argv, flags)
    else:
        named = {dest for dest, default in defaults.items() if getattr(args, dest, default) != default}
    given = [flags.get(dest, ["--" + dest.replace("_", "-")])[0] for dest in defaults if dest in named]
    if given:
        raise UsageError(
            f"--load {args.load} brings its own architecture, weights and plan; {', '.join(given)} would be "
            "ignored: drop them, or use --model without --load"
        )


def patched_model(args: argparse.Namespace, **apply_kwargs) -> nn.Module:
    """The patched model in eval mode: ``--load`` as saved, else ``--model`` patched with the plan options."""
    import evit_patch

    if getattr(args, "load", None):
        check_load_conflicts(args)
        return evit_patch.load_pretrained(args.load)
    fast = evit_patch.apply(load_model(args), **plan_arguments(args), **plan_options(args), **apply_kwargs)
    return fast.eval()
