"""Token reducers side by side on the genuine DeiT-Tiny and the 825 real images of ../shared/data.

Each reducer is a callable ``model -> reduced model``, named by a spec:

- ``original``: the model itself;
- ``tome:r=<int>``: the ToMe re-implementation of tools/tome_baseline.py;
- ``evit:<key>=<value>:...``: ``evit_patch.apply(model, key=value, ...)``; every key passes through,
  values parsed as int, float, bool, None or comma lists (``evit:layers=3,6,9:keep=0.7``,
  ``evit:flops=0.65``).

Reported per reducer: MACs counted by ``FlopCounterMode`` on one image (math SDPA backend, so
attention matmuls count; MACs = FLOPs / 2) and their ratio to the original, agreement with the
original's predictions, mean KL(original || reduced) in nats, and top-1 against the manifests'
labels. ``--speed`` adds measured CPU speedups on a random-init DeiT-S beside the FLOP ideal (``--cpu-time``:
one thread, thread CPU time, steadier on a shared machine);
``--plot`` draws the Pareto fronts (needs matplotlib).

    python tools/side_by_side.py original tome:r=13 evit:layers=3,6,9:keep=0.7 --speed --plot pareto.png
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tome_baseline import apply_tome  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import evit_patch  # noqa: E402
from evit_patch.bench.speed import compare_speed, time_interleaved  # noqa: E402

SHARED = Path(os.environ.get("EVIT_PATCH_SHARED", ROOT.parent / "shared" / "data"))
DEFAULT_REDUCERS = [
    "original",
    *(f"tome:r={r}" for r in (4, 8, 11, 13, 16)),
    *(f"evit:layers=3,6,9:keep={k}" for k in (0.9, 0.8, 0.7, 0.5)),
]
Reducer = Callable[[nn.Module], nn.Module]


def parse_value(text: str):
    """``"3,6,9"`` -> ``[3, 6, 9]``, ``"0.7"`` -> ``0.7``, ``"true"`` -> ``True``, else the string."""
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part]
    special = {"true": True, "false": False, "none": None}
    if text.lower() in special:
        return special[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_reducer(spec: str) -> Reducer:
    """The reducer a spec names (see the module docstring)."""
    kind, *pairs = spec.split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"reducer {spec!r}: expected key=value, got {pair!r}")
        options[key] = parse_value(value)
    if kind == "original":
        if options:
            raise ValueError(f"reducer {spec!r}: 'original' takes no options")
        return lambda model: model
    if kind == "tome":
        if set(options) != {"r"} or not isinstance(options["r"], int):
            raise ValueError(f"reducer {spec!r}: expected tome:r=<int>")
        return functools.partial(apply_tome, r=options["r"])
    if kind == "evit":
        return lambda model: evit_patch.apply(model, **options)
    raise ValueError(f"reducer {spec!r}: unknown kind {kind!r} (original, tome, evit)")


def counted_macs(model: nn.Module, img_size: int = 224) -> float:
    """MACs of one image by ``FlopCounterMode``; the math SDPA backend makes attention matmuls visible."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops() / 2


@torch.inference_mode()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)])


@dataclass(frozen=True)
class Row:
    name: str
    macs: float
    macs_ratio: float
    agreement: float
    """Percent of images whose argmax equals the original's."""
    kl: float
    """Mean KL(original || reduced) of the softmax outputs, nats."""
    top1: float


def compare(
    model: nn.Module,
    reducers: dict[str, Reducer],
    images: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor | None = None,
) -> list[Row]:
    """One :class:`Row` per reducer; ``reference``: the original's logits, if already computed."""
    reference = logits(model, images) if reference is None else reference
    base_macs = counted_macs(model)
    log_p = reference.log_softmax(-1)
    rows = []
    for name, reduce in reducers.items():
        reduced = reduce(model)
        out = reference if reduced is model else logits(reduced, images)
        macs = counted_macs(reduced)
        kl = F.kl_div(out.log_softmax(-1), log_p, log_target=True, reduction="batchmean").item()
        agreement = 100 * (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
        top1 = 100 * (out.argmax(-1) == labels).float().mean().item()
        rows.append(Row(name, macs, macs / base_macs, agreement, kl, top1))
        print(f"{name}: {macs / base_macs:.3f}x MACs, agreement {agreement:.1f} %, KL {kl:.3f}", file=sys.stderr)
    return rows


def markdown(rows: list[Row]) -> str:
    lines = [
        "| reducer | GMACs | MACs ratio | agreement % | mean KL | top-1 % |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| `{r.name}` | {r.macs / 1e9:.3f} | {r.macs_ratio:.2f}x | {r.agreement:.1f} | {r.kl:.3f} | {r.top1:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


def speed(
    reducers: dict[str, Reducer],
    model_name: str = "deit_small_patch16_224",
    batch_size: int = 16,
    rounds: int = 5,
    cpu_time: bool = False,
) -> str:
    """Markdown table of measured CPU speedups beside the FLOP ideal.

    Default: wall time, each reducer against the original by ``compare_speed`` (interleaved rounds).
    ``cpu_time``: one thread, all models interleaved in each round, timed in thread CPU time
    (``time_interleaved``), which other jobs on a shared machine barely disturb.
    """
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    x = torch.randn(batch_size, 3, 224, 224)
    base_macs = counted_macs(model)
    reduced = {name: reduce(model) for name, reduce in reducers.items()}
    ideal = {name: base_macs / counted_macs(m) for name, m in reduced.items()}
    clock = "single-thread CPU time" if cpu_time else "wall time"
    lines = [
        f"| reducer ({model_name}, batch {batch_size}, {rounds} rounds, {clock}) | measured speedup | FLOP ideal |",
        "| --- | ---: | ---: |",
    ]
    if cpu_time:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                runners = {name: functools.partial(m, x) for name, m in {"original": model, **reduced}.items()}
                seconds = time_interleaved(runners, rounds=rounds, warmup=1, settle=0, clock=time.thread_time)
        finally:
            torch.set_num_threads(threads)
        measured = {name: f"{seconds['original'] / seconds[name]:.2f}x" for name in reduced}
    else:
        measured = {}
        for name, m in reduced.items():
            result = compare_speed(model, m, x, rounds=rounds, progress=False)
            low, high = result.speedup_spread
            measured[name] = f"{result.speedup:.2f}x ({low:.2f}-{high:.2f})"
    for name in reduced:
        lines.append(f"| `{name}` | {measured[name]} | {ideal[name]:.2f}x |")
        print(f"{name}: {measured[name]} measured, {ideal[name]:.2f}x ideal", file=sys.stderr)
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Agreement and KL against the MACs ratio, one series per reducer kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    kinds: dict[str, list[Row]] = {}
    for row in rows:
        kind = row.name.split(":")[0] + (" (method=merge)" if "method=merge" in row.name else "")
        kinds.setdefault(kind, []).append(row)
    for kind, series in kinds.items():
        series = sorted(series, key=lambda r: r.macs_ratio)
        for axis, field in zip(axes, ("agreement", "kl")):
            axis.plot([r.macs_ratio for r in series], [getattr(r, field) for r in series], "o-", label=kind)
    for axis, label in zip(axes, ("agreement with the original (%)", "mean KL(original || reduced), nats")):
        axis.set_xlabel("counted MACs / original")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle("DeiT-Tiny (genuine weights), 825 real ImageNet images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def load_real(shared: Path = SHARED) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The genuine DeiT-Tiny and the 825 images (75 val + 750 sample), decoded once and cached."""
    from timm.data import create_transform, resolve_data_config

    from evit_patch.bench.data import load_images
    from evit_patch.deploy.weights import create_model

    model = create_model("deit_tiny_patch16_224", checkpoint=shared / "weights" / "deit_tiny_patch16_224.safetensors")
    transform = create_transform(**resolve_data_config({}, model=model))
    parts = [load_images(shared / "images" / f"{s}.csv", transform) for s in ("imagenet_val", "imagenet_sample")]
    return model, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reducers", nargs="*", default=DEFAULT_REDUCERS, help="reducer specs (default: %(default)s)")
    parser.add_argument(
        "--speed", nargs="*", default=None, metavar="SPEC", help="time these reducers (none given: all but original)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--cpu-time", action="store_true", help="--speed: one thread, timed in thread CPU time")
    parser.add_argument("--plot", type=Path, default=None, help="Pareto plot PNG (needs matplotlib)")
    args = parser.parse_args()
    reducers = {spec: parse_reducer(spec) for spec in args.reducers}
    model, images, labels = load_real()
    rows = compare(model, reducers, images, labels)
    print(f"DeiT-Tiny (genuine weights), {len(images)} real ImageNet images\n")
    print(markdown(rows))
    if args.plot is not None:
        plot(rows, args.plot)
    if args.speed is not None:
        timed = args.speed or [spec for spec in args.reducers if spec != "original"]
        print("\nCPU timing, random-init weights, same process (on a shared machine wall time is noisy)\n")
        print(speed({spec: parse_reducer(spec) for spec in timed}, rounds=args.rounds, cpu_time=args.cpu_time))


if __name__ == "__main__":
    main()
