"""``finetune``: recover the accuracy a patched model lost, by distilling its unpatched original.

    evit-patch finetune --model deit_small_patch16_224 --pretrained --layers 3 6 9 --keep 0.7 \\
        --data-dir /data/imagenet/train --val-dir /data/imagenet/val --epochs 1 --batch-size 256 \\
        --amp --torchcompile --output runs/deit_s_k07
    evit-patch finetune --model deit_tiny_patch16_224 --checkpoint w.safetensors --flops 0.45 --method merge \\
        --distill-only --data-dir train.csv --val-dir val.csv --output runs/merge_045
    torchrun --nproc_per_node 8 tools/finetune.py ...          # same flags, one process per GPU
    evit-patch finetune --resume runs/deit_s_k07      # continues where it stopped, with the flags in its args.json

The teacher is the original model (frozen); the student is ``evit_patch.apply`` of it, and its
keep rate warms up from 1.0 to ``--keep``, or to the rates a ``--flops``/``--speedup`` budget plans
(with ``--method merge``, at every block from D/4 on). ``--data-dir`` is an ImageFolder tree, a
folder of unlabelled images or a ``file,label`` manifest CSV. The result reloads with
``evit_patch.load_pretrained("<output>/final")``; with ``--val-dir``, ``<output>/best`` is the
model with the lowest validation KL to the original, the untouched patched model included (its
evaluation is in ``<output>/best.json``). ``--batch-size`` is per process, as in timm.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch

import evit_patch

from ..deploy.weights import create_model
from ..errors import CheckpointError, UsageError
from ..families import find_family
from ..train import checkpoint, distributed
from ..train.data import (
    ResumableBatches,
    TrainImages,
    check_labels,
    find_images,
    train_loader,
    train_transform,
    val_loader,
)
from ..train.loop import AMP_DTYPES, BEST_NAME, TrainConfig, Trainer
from .common import add_model_arguments, device, plan_arguments, plan_options, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--img-size",
        type=positive_int,
        default=None,
        help="build the model for this input size (--checkpoint position embeddings are resampled as timm does)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="ImageFolder tree, image folder or manifest .csv (required)"
    )
    parser.add_argument("--val-dir", type=Path, default=None, help="labelled ImageFolder or manifest to evaluate on")
    parser.add_argument("--output", type=Path, default=None, help="run directory (default: the --resume directory)")
    parser.add_argument("--resume", type=Path, default=None, help="continue the run saved in this output directory")
    parser.add_argument("--epochs", type=int, default=1, help="passes over --data-dir (default: 1)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per process and micro-batch")
    parser.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument(
        "--lr", type=float, default=1e-5, help="peak AdamW learning rate (default: %(default)s; see docs/finetuning.md)"
    )
    parser.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine decay")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="LR warm-up steps (default: 5%% of the run)")
    parser.add_argument("--keep-warmup", type=int, default=None, help="keep warm-up steps (default: half the run)")
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default: 2)")
    parser.add_argument("--ce-weight", type=float, default=1.0, help="weight of cross-entropy on labelled images")
    parser.add_argument("--distill-only", action="store_true", help="ignore labels: distillation loss only")
    parser.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
    parser.add_argument("--amp", action="store_true", help="autocast with --amp-dtype")
    parser.add_argument("--amp-dtype", choices=sorted(AMP_DTYPES), default="bfloat16", help="--amp: autocast dtype")
    parser.add_argument("--torchcompile", action="store_true", help="torch.compile the student after keep warm-up")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--no-aug", action="store_true", help="train on the eval transform (no augmentation)")
    parser.add_argument("--seed", type=int, default=42, help="data order, augmentation and init seed")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader processes")
    parser.add_argument("--device", type=device, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads per process (default: torch's)")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="optimizer steps between checkpoints")
    parser.add_argument("--keep-checkpoints", type=int, default=1, help="checkpoints kept on disk")


_NOT_RESUMED = {"resume", "output", "run", "command", "argv"}
_PATHS = {"data_dir", "val_dir", "checkpoint"}
_AMOUNT = {"keep", "flops", "speedup"}
"""How much the plan keeps: one of them is the plan's (a budget wins over --keep's default)."""


def _given(argv: list[str]) -> set[str]:
    """The destinations of the finetune flags present in ``argv`` (defaults do not count)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    for action in parser._actions:
        action.default, action.required = argparse.SUPPRESS, False
    known, _ = parser.parse_known_args(argv)  # the subcommand name, if any, is left over
    return set(vars(known))


def _resumed_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with each flag not given on this command line taken from the resumed run's ``args.json``.

    Needs ``args.argv`` (set by the ``evit-patch`` CLI and ``tools/finetune.py``) to tell a flag given
    at its default value from one not given; without it, ``args`` are used as they are.
    """
    saved_path = Path(args.resume) / "args.json" if args.resume is not None else None
    argv = getattr(args, "argv", None)
    if saved_path is None or argv is None or not saved_path.is_file():
        return args
    given = _given(argv)
    try:
        saved = json.loads(saved_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{saved_path}: not valid JSON ({exc})") from exc
    amount = _AMOUNT if given & _AMOUNT else set()  # --keep on this command line replaces a saved budget
    for key, value in saved.items():
        if key in _NOT_RESUMED or key in given or key in amount or not hasattr(args, key):
            continue
        setattr(args, key, Path(value) if key in _PATHS and value is not None else value)
    return args


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse malformed flags before any model is built."""
    if args.data_dir is None:
        raise UsageError("give --data-dir (or --resume a run started with one)")
    for name in ("epochs", "batch_size", "grad_accum_steps", "max_steps", "keep_checkpoints"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {args.temperature}")
    if args.val_dir is not None and not args.val_dir.exists():
        raise FileNotFoundError(f"--val-dir {args.val_dir} does not exist: expected a labelled ImageFolder or manifest")


def _fingerprint(model: torch.nn.Module) -> str:
    """A digest of the teacher's weights: resuming against other weights is refused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _identity(args, ctx, teacher, student, num_images: int) -> dict:
    """What a resumed run must share with the checkpoint: model, plan, teacher, data order."""
    config = evit_patch.get_config(student)
    return {
        "model": args.model,
        "layers": list(config.layers),
        "keep": list(config.keep),
        "fuse": config.fuse,
        "method": config.method.value,
        "proportional": config.proportional,
        "img_size": list(find_family(teacher).input_size(teacher)),
        "teacher_weights": _fingerprint(teacher),
        "images": num_images,
        "global_batch": args.batch_size * ctx.world_size * args.grad_accum_steps,
        "seed": args.seed,
    }


def _train_config(args, labelled: bool) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        keep_warmup=args.keep_warmup,
        temperature=args.temperature,
        ce_weight=args.ce_weight,
        distill_only=args.distill_only or not labelled,
        clip_grad=args.clip_grad,
        grad_accum_steps=args.grad_accum_steps,
        amp=args.amp_dtype if args.amp else None,
        torchcompile=args.torchcompile,
        channels_last=args.channels_last,
        max_steps=args.max_steps,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
    )


def _output_dir(args: argparse.Namespace) -> Path:
    output = args.output or args.resume
    if output is None:
        raise UsageError("give --output for a new run, or --resume <output dir> to continue one")
    if args.resume is None and checkpoint.complete(output):
        raise CheckpointError(
            f"--output {output} already holds a run ({checkpoint.complete(output)[-1].name}); "
            f"pass --resume {output} to continue it, or choose another --output"
        )
    return Path(output)


def _check_resume(args: argparse.Namespace) -> None:
    """``--resume`` names a run directory that exists (else every other message would mislead)."""
    if args.resume is None:
        return
    if not args.resume.exists():
        raise FileNotFoundError(
            f"--resume {args.resume} does not exist: expected the --output directory of an earlier finetune run"
        )
    if not args.resume.is_dir():
        raise UsageError(
            f"--resume {args.resume} is a file: expected the --output directory of an earlier finetune run"
        )


def run(args: argparse.Namespace) -> dict:
    _check_resume(args)
    args = _resumed_arguments(args)
    _check_arguments(args)
    output = _output_dir(args)
    resume_dir = checkpoint.latest(args.resume) if args.resume is not None else None
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = distributed.init(args.device)
    try:
        return _run(args, ctx, output, resume_dir)
    finally:
        distributed.shutdown(ctx)


def _run(args, ctx, output: Path, resume_dir: Path | None) -> dict:
    begin = time.perf_counter()
    items, labelled = find_images(args.data_dir)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    torch.manual_seed(args.seed)  # the same (random-init) teacher on every rank
    teacher = create_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, **kwargs)
    student = evit_patch.apply(teacher, **plan_arguments(args), **plan_options(args))
    torch.manual_seed(args.seed + ctx.rank)
    if labelled and not args.distill_only:
        check_labels(args.data_dir, items, teacher.num_classes)
    if not labelled and not args.distill_only and ctx.is_main:
        print(f"{args.data_dir}: no labels, distillation only")
    dataset = TrainImages(items, train_transform(teacher, augment=not args.no_aug), seed=args.seed)
    batches = ResumableBatches(
        len(items),
        args.batch_size,
        seed=args.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        accum=args.grad_accum_steps,
    )
    loader = train_loader(dataset, batches, workers=args.workers, pin_memory=ctx.device.type == "cuda")
    identity = _identity(args, ctx, teacher, student, len(items))
    cfg = _train_config(args, labelled)
    trainer = Trainer(teacher, student, loader, cfg, ctx, output, identity)
    if resume_dir is not None:
        trainer.resume(resume_dir)
    if ctx.is_main:
        output.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(output)
        if resume_dir is None:
            flags = {k: v for k, v in vars(args).items() if k not in {"run", "argv"}}
            (output / "args.json").write_text(json.dumps(flags, indent=2, default=str) + "\n")
        print(
            f"{args.model} layers {identity['layers']} keep {identity['keep']}: {len(items)} images, "
            f"{ctx.world_size} process(es) on {ctx.device}, global batch {identity['global_batch']}, "
            f"{trainer.total_steps} steps (LR warm-up {trainer.lr_warmup}, keep warm-up {trainer.keep_warmup})"
            + (f"; resuming {resume_dir} at step {trainer.position.step}" if resume_dir else ""),
            flush=True,
        )
    val = None
    if args.val_dir is not None and ctx.is_main:
        val = val_loader(args.val_dir, teacher, batch_size=args.batch_size, workers=args.workers)
    result = trainer.fit(val, resumed=resume_dir is not None)
    final = trainer.save_final()
    best = output / BEST_NAME
    summary = {
        **result,
        "final": str(final) if final else None,
        "best": {"path": str(output / "best"), **json.loads(best.read_text())} if best.is_file() else None,
        "identity": identity,
        "wall_s": time.perf_counter() - begin,
    }
    if ctx.is_main:
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"saved {final}: reload with evit_patch.load_pretrained({str(final)!r})", flush=True)
    return summary
