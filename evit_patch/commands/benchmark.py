"""``benchmark``: throughput of the original and the patched model, timed in one process.

    evit-patch benchmark --model deit_small_patch16_224 --layers 3 6 9 --keep 0.7 \\
        --batch-size 1 16 64 [--amp bf16] [--torchcompile] [--device cuda] [--json out.json]

Rounds alternate between the two models, warm-up rounds are discarded, CUDA is timed with
events; medians are reported with the per-round speedup range. ``--overhead`` times the inserted
nodes alone (keep 1.0 with the reorganization forced on). ``--sweep`` walks keep rates x layer
sets and writes CSV/JSON (and a Pareto plot with matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import evit_patch

from ..bench.memory import peak_memory_bytes
from ..bench.speed import compare_speed
from ..errors import UsageError
from ..families import find_family
from ..reductions.base import Permutation
from .common import (
    add_model_arguments,
    budget_arguments,
    device,
    load_model,
    non_negative_int,
    plan_arguments,
    plan_options,
    positive_int,
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--batch-size", type=positive_int, nargs="+", default=[1, 16, 64], help="batch sizes timed (default: 1 16 64)"
    )
    parser.add_argument("--img-size", type=positive_int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--rounds", type=positive_int, default=10, help="timed rounds per model (default: 10)")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="discarded rounds first (default: 3)")
    parser.add_argument(
        "--device",
        type=device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)",
    )
    parser.add_argument("--amp", choices=sorted(_DTYPES), default=None, help="autocast dtype")
    parser.add_argument("--torchcompile", action="store_true", help="compile both models (inductor)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--overhead", action="store_true", help="keep 1.0 with reorganization forced on")
    parser.add_argument("--sweep", action="store_true", help="grid of --sweep-keep x --sweep-layers")
    parser.add_argument(
        "--sweep-keep", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5], help="--sweep: keep rates"
    )
    parser.add_argument(
        "--sweep-layers",
        nargs="+",
        default=["3,6,9", "2,5,8", "4,7,10", "3,5,7,9"],
        help="--sweep: layer sets, each comma-separated (default: 3,6,9 2,5,8 4,7,10 3,5,7,9)",
    )
    parser.add_argument("--data", type=Path, nargs="*", default=[], help="manifests/ImageFolders for sweep agreement")
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON (sweep: also .csv)")
    parser.add_argument("--plot", type=Path, default=None, help="sweep: Pareto plot PNG (needs matplotlib)")


def counted_gmacs(model: torch.nn.Module, image: torch.Tensor) -> float:
    """GMACs per image by ``FlopCounterMode`` under the math SDPA backend (fused CPU kernels are missed),
    with grad enabled: ``nn.MultiheadAttention`` (torchvision, open_clip) would otherwise take its fused
    inference path, which the counter misses too."""
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(image)
    return counter.get_total_flops() / 2 / len(image) / 1e9


def _runner(model, args, device):
    """The callable that is timed: autocast and compilation as requested."""
    fn = torch.compile(model) if args.torchcompile else model
    if args.amp is None:
        return fn

    def run(x):
        with torch.autocast(device.type, dtype=_DTYPES[args.amp]):
            return fn(x)

    return run


def _first_call_seconds(fn, x, device) -> float:
    begin = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - begin


def _environment(args, device) -> str:
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    mode = "compiled" if args.torchcompile else "eager"
    return (
        f"{name} ({device.type}{threads}), {args.amp or 'float32'}, {mode}, "
        f"torch {torch.__version__}, timm {timm.__version__}"
    )


def _measure(model, fast, args, device, batch_sizes, img_size):
    explanation = evit_patch.explain(fast, img_size=img_size)
    channels_hw = (3, *(explanation.img_size or find_family(model).input_size(model)))
    probe = torch.randn(1, *channels_hw, device=device)
    counted = (counted_gmacs(model, probe), counted_gmacs(fast, probe))
    run_a, run_b = _runner(model, args, device), _runner(fast, args, device)
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, *channels_hw, device=device)
        compile_s = (_first_call_seconds(run_a, x, device), _first_call_seconds(run_b, x, device))
        speed = compare_speed(run_a, run_b, x, rounds=args.rounds, warmup=args.warmup)
        with torch.inference_mode():
            memory = [peak_memory_bytes(lambda f=f, x=x: f(x), device) for f in (run_a, run_b)]
        rows.append(
            {
                "batch_size": batch,
                "img_s_original": speed.throughput(False),
                "img_s_patched": speed.throughput(True),
                "speedup": speed.speedup,
                "speedup_range": list(speed.speedup_spread),
                "ideal_speedup": explanation.ideal_speedup,
                "efficiency": speed.speedup / explanation.ideal_speedup,
                "gmacs_original": explanation.macs_original / 1e9,
                "gmacs_patched": explanation.macs_patched / 1e9,
                "gmacs_counted": list(counted),
                "peak_mb": [None if m is None else m / 2**20 for m in memory],
                "first_call_s": list(compile_s) if args.torchcompile else None,
            }
        )
    return explanation, rows


def _print_rows(rows, compiled: bool) -> None:
    header = (
        f"{'batch':>5} {'img/s orig':>10} {'img/s EViT':>10} {'speedup':>8} {'range':>11} {'ideal':>6} {'effic.':>6}"
    )
    header += f" {'peak MB orig':>12} {'peak MB EViT':>12}" + (f" {'compile s':>13}" if compiled else "")
    print(header)
    for r in rows:
        mem = " ".join(f"{m:>12.1f}" if m is not None else f"{'n/a':>12}" for m in r["peak_mb"])
        line = (
            f"{r['batch_size']:>5} {r['img_s_original']:>10.1f} {r['img_s_patched']:>10.1f} {r['speedup']:>7.2f}x "
            f"{r['speedup_range'][0]:>5.2f}-{r['speedup_range'][1]:<5.2f} {r['ideal_speedup']:>5.2f}x "
            f"{r['efficiency']:>6.2f} {mem}"
        )
        if compiled:
            line += f" {r['first_call_s'][0]:>6.1f}/{r['first_call_s'][1]:<6.1f}"
        print(line)


def _sweep(model, args, device) -> list[dict]:
    from timm.data import create_transform, resolve_data_config

    from ..bench.data import load_images
    from ..bench.quality import compare

    transform = create_transform(**resolve_data_config({}, model=model))
    sets = [load_images(p, transform) for p in args.data]
    images = torch.cat([s[0] for s in sets]) if sets else None
    labels = torch.cat([s[1] for s in sets]) if sets else None
    rows = []
    for layers in args.sweep_layers:
        layer_list = [int(v) for v in layers.split(",")]
        for keep in args.sweep_keep:
            fast = evit_patch.apply(model, layers=layer_list, keep=keep, **plan_options(args))
            fast = fast.to(device)
            _, measured = _measure(model, fast, args, device, args.batch_size[:1], args.img_size)
            row = {"layers": layers, "keep": keep, **measured[0]}
            if images is not None:
                c = compare(model, fast, images, labels, progress=False)
                row |= {"agreement": c.agreement, "top1_original": c.top1_original, "top1_patched": c.top1_patched}
            print(
                f"layers {layers:>9} keep {keep:.2f}: {row['gmacs_patched']:.3f} GMACs, "
                f"speedup {row['speedup']:.2f}x (ideal {row['ideal_speedup']:.2f}x)"
                + (f", agreement {100 * row['agreement']:.1f} %" if "agreement" in row else "")
            )
            rows.append(row)
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    keys = [k for k in rows[0] if not isinstance(rows[0][k], list)]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install 'evit_patch[plot]'): no plot written to {path}")
        return
    metric = "agreement" if "agreement" in rows[0] else "ideal_speedup"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for layers in dict.fromkeys(r["layers"] for r in rows):
        sub = [r for r in rows if r["layers"] == layers]
        axes[0].plot([r["gmacs_patched"] for r in sub], [r[metric] for r in sub], "o-", label=f"layers {layers}")
        axes[1].plot([r["speedup"] for r in sub], [r[metric] for r in sub], "o-", label=f"layers {layers}")
    axes[0].set_xlabel("GMACs per image")
    # A ratio timed against the original in the same rounds: absolute img/s drifts with machine load.
    axes[1].set_xlabel("measured throughput, relative to the original")
    for ax in axes:
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def run(args: argparse.Namespace) -> dict:
    budget = budget_arguments(args)
    clash = [flag for flag, on in (("--sweep", args.sweep), ("--overhead", args.overhead)) if on]
    if budget and clash:
        raise UsageError(f"{clash[0]} sets its own keep rates; drop it, or drop --flops/--speedup")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(args).to(device)
    print(f"{args.model}: {_environment(args, device)}")
    results: dict = {"model": args.model, "environment": _environment(args, device), "layers": args.layers}
    if args.sweep:
        results["sweep"] = rows = _sweep(model, args, device)
        if args.json:
            _write_csv(rows, args.json.with_suffix(".csv"))
        if args.plot:
            _plot(rows, args.plot)
    else:
        amount = {"keep": 1.0} if args.overhead else plan_arguments(args)
        fast = evit_patch.apply(model, **{"layers": args.layers, **amount}, **plan_options(args)).to(device)
        config = evit_patch.get_config(fast)
        keep = amount.get("keep", list(config.keep))
        if args.overhead:  # rank and gather every token, drop none
            for module in evit_patch.reorganizers(fast):
                module.reduction = Permutation()
        explanation, rows = _measure(model, fast, args, device, args.batch_size, args.img_size)
        what = "forced reorganization at keep 1.0 (overhead)" if args.overhead else f"keep {keep}"
        if budget:
            what = f"{' '.join(f'{k} {v}' for k, v in budget.items())}: keep {config.keep[0]:.4g}"
        layers = list(config.layers) if budget else args.layers
        print(
            f"layers {layers}, {what}: {explanation.macs_original / 1e9:.3f} -> "
            f"{explanation.macs_patched / 1e9:.3f} GMACs/img (FlopCounterMode: {rows[0]['gmacs_counted'][0]:.3f} "
            f"-> {rows[0]['gmacs_counted'][1]:.3f}), ideal speedup {explanation.ideal_speedup:.3f}x"
        )
        _print_rows(rows, args.torchcompile)
        results |= {"keep": keep, "overhead": args.overhead, "rows": rows, **budget}
        if budget:
            results["layers"] = list(config.layers)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results
