"""``export``: write a patched model as ONNX, a torch.export program (.pt2) or safetensors + JSON.

    evit-patch export --model deit_tiny_patch16_224 --checkpoint w.safetensors --keep 0.7 \\
        --format onnx --output deit_tiny_evit.onnx --verify
    evit-patch export --load ./deit-tiny-evit --format pt2 --output deit_tiny_evit.pt2 --verify
    evit-patch export --model deit_tiny_patch16_224 --pretrained --format safetensors --output ./deit-tiny-evit

The batch dimension stays dynamic unless --static-batch. --verify reloads what was written and
compares it with the eager patched model on seeded random images at batch 1 and --batch-size.
With ONNX, two [CLS] scores tied to float32 precision at the keep boundary can make onnxruntime
keep the other token; random-init models, whose attention is nearly uniform, are prone to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import evit_patch

from ..deploy.atomic import write_atomically
from ..deploy.export import example_input, export_onnx, export_program, onnx_session
from ..deploy.persist import CONFIG_NAME, WEIGHTS_NAME
from ..errors import UsageError
from .common import add_load_argument, add_model_arguments, patched_model, positive_int

FORMATS = ("onnx", "pt2", "safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_load_argument(parser)
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="default: %(default)s")
    parser.add_argument("--output", type=Path, required=True, help="file (onnx, pt2) or directory (safetensors)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="example batch for export and --verify")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size to --batch-size")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--verify", action="store_true", help="reload the output and compare with eager")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="--verify: max abs logit difference")


def _write(model: torch.nn.Module, args: argparse.Namespace) -> None:
    example = example_input(model, args.batch_size)
    if args.format == "onnx":
        export_onnx(
            model, args.output, example, dynamic_batch=not args.static_batch, opset=args.opset, overwrite=args.overwrite
        )
    elif args.format == "pt2":
        program = export_program(model, example, dynamic_batch=not args.static_batch)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(args.output, lambda tmp: torch.export.save(program, tmp))
    else:
        evit_patch.save_pretrained(model, args.output, overwrite=args.overwrite)


def _remove_output(args: argparse.Namespace, created: bool) -> None:
    """Delete what :func:`_write` wrote (a model that failed --verify is not left to be deployed);
    a --format safetensors folder goes too if this run ``created`` it and nothing else is in it."""
    output = args.output
    if args.format != "safetensors":
        output.unlink(missing_ok=True)
        Path(f"{output}.data").unlink(missing_ok=True)  # ONNX external data, above 1 GiB of weights
        return
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        (output / name).unlink(missing_ok=True)
    if created and not any(output.iterdir()):
        output.rmdir()


def _reloaded(args: argparse.Namespace):
    """The written artefact as a function of a tensor batch."""
    if args.format == "onnx":
        session = onnx_session(args.output)
        return lambda x: torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    if args.format == "pt2":
        return torch.export.load(args.output).module()
    return evit_patch.load_pretrained(args.output)


def verify(model: torch.nn.Module, args: argparse.Namespace) -> dict[int, float]:
    """Max abs difference between the written model and ``model``, per verified batch size."""
    run = _reloaded(args)
    batches = [args.batch_size] if args.static_batch else sorted({1, args.batch_size})
    differences = {}
    for batch in batches:
        x = example_input(model, batch, seed=batch)
        with torch.no_grad():
            differences[batch] = (run(x) - model(x)).abs().max().item()
    return differences


def _check_output(args: argparse.Namespace) -> None:
    """Refuse to replace an existing file (or saved model) unless --overwrite says so."""
    output = args.output
    exists = output.is_file() or (output.is_dir() and (args.format != "safetensors" or any(output.iterdir())))
    if exists and not args.overwrite:
        kind = "a non-empty folder" if output.is_dir() else "a file"
        raise UsageError(f"--output {output} exists ({kind}); pass --overwrite to replace it, or choose another path")
    if output.is_dir() and args.format != "safetensors":
        raise UsageError(f"--output {output} is a folder; --format {args.format} writes a file")


def run(args: argparse.Namespace) -> dict:
    _check_output(args)
    model = patched_model(args)
    created = not args.output.exists()
    _write(model, args)
    print(f"wrote {args.output} ({args.format}, {'static' if args.static_batch else 'dynamic'} batch)")
    result: dict = {"output": str(args.output), "format": args.format}
    if args.verify:
        try:
            result["max_abs_difference"] = differences = verify(model, args)
        except BaseException:
            _remove_output(args, created)
            raise
        for batch, difference in differences.items():
            print(f"verify batch {batch}: max |{args.format} - eager| = {difference:.3g}")
        worst = max(differences.values())
        if not worst <= args.tolerance:
            _remove_output(args, created)
            raise evit_patch.EViTError(
                f"export verification failed: {args.output} differs from the eager model by {worst:.3g} "
                f"(tolerance {args.tolerance}); removed it"
            )
    return result
