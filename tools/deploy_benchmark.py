"""onnxruntime vs eager PyTorch latency on this CPU, for the original and the EViT-patched model.

    python tools/deploy_benchmark.py                                   # real DeiT-Tiny, keep 0.7 @ 3, 6, 9
    python tools/deploy_benchmark.py --batch-size 1 16 --rounds 40 --json deploy.json

Both models are exported with evit_patch.export_onnx (dynamic batch); onnxruntime runs on the
CPU with as many intra-op threads as torch. Per batch size, the four runners (eager/onnxruntime x
original/patched) are timed in interleaved rounds after warm-up, each timed call after an untimed
one of the same runner (so no runtime pays for another's spinning threads), and medians are
reported with the ratios between them. Run it on an otherwise idle machine; on a busy shared
host, --cpu-time runs everything on one thread and times thread CPU time instead of wall time.
Weights: --checkpoint, else ../shared/data/weights/<model>.safetensors, else the hub (--pretrained).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime
import timm
import torch

import evit_patch
from evit_patch.bench.speed import time_interleaved
from evit_patch.deploy.export import INPUT_NAME, example_input, onnx_session
from evit_patch.deploy.weights import create_model

RUNNERS = ("eager original", "eager patched", "onnxruntime original", "onnxruntime patched")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="1 thread, timed in thread CPU time (shared hosts)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.cpu_time:
        if args.threads not in (None, 1):
            parser.error("--cpu-time times one thread: leave --threads out or set it to 1")
        args.threads = 1

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    local = SHARED / "weights" / f"{args.model}.safetensors"
    checkpoint = args.checkpoint or (local if not args.pretrained and local.is_file() else None)
    original = create_model(args.model, checkpoint=checkpoint, pretrained=checkpoint is None)
    patched = evit_patch.apply(original, layers=args.layers, keep=args.keep).eval()
    environment = (
        f"{cpu_name()}, {threads} threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"timm {timm.__version__}, Python {platform.python_version()}"
    )
    environment += ", thread CPU time" if args.cpu_time else ", wall-clock time"
    print(f"{args.model} ({checkpoint or 'hub weights'}), keep {args.keep} at {args.layers}\n{environment}")
    results: dict = {"model": args.model, "layers": args.layers, "keep": args.keep, "environment": environment}
    with tempfile.TemporaryDirectory() as folder:
        sessions = {
            name: onnx_session(evit_patch.export_onnx(model, Path(folder) / f"{name}.onnx"), threads=threads)
            for name, model in (("original", original), ("patched", patched))
        }
        rows = []
        for batch in args.batch_size:
            runners = _runners({"original": original, "patched": patched}, sessions, example_input(original, batch))
            with torch.inference_mode():
                clock = time.thread_time if args.cpu_time else time.perf_counter
                seconds = time_interleaved(runners, rounds=args.rounds, warmup=args.warmup, clock=clock)
            rows.append({"batch_size": batch, "ms": {k: 1e3 * v for k, v in seconds.items()}})
    results["rows"] = rows
    _print(rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _runners(models: dict, sessions: dict, x: torch.Tensor) -> dict:
    feed = {INPUT_NAME: x.numpy()}
    runners = {f"eager {name}": (lambda m=model: m(x)) for name, model in models.items()}
    runners |= {f"onnxruntime {name}": (lambda s=session: s.run(None, feed)) for name, session in sessions.items()}
    return runners


def _print(rows: list[dict]) -> None:
    print(f"\n{'batch':>5} {'runner':<21} {'median ms':>10} {'img/s':>8}")
    for row in rows:
        for name, ms in row["ms"].items():
            print(f"{row['batch_size']:>5} {name:<21} {ms:>10.2f} {1e3 * row['batch_size'] / ms:>8.1f}")
    print("\nspeedups (time ratio; > 1 is faster): onnxruntime over eager, and EViT over the original")
    header = ("batch", "ORT orig", "ORT EViT", "EViT eager", "EViT ORT", "EViT ORT/orig eager")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 9, 9, 11, 9, 20))))
    for row in rows:
        ms = row["ms"]
        eager_o, eager_p, ort_o, ort_p = (ms[k] for k in RUNNERS)
        print(
            f"{row['batch_size']:>5} {eager_o / ort_o:>8.2f}x {eager_p / ort_p:>8.2f}x {eager_o / eager_p:>10.2f}x "
            f"{ort_o / ort_p:>8.2f}x {eager_o / ort_p:>19.2f}x"
        )


if __name__ == "__main__":
    main()
