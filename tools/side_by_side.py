"""Token reducers side by side on the genuine DeiT-Tiny and the 825 real images of ../shared/data.

Each reducer is a callable ``model -> reduced model``, named by a spec:

- ``original``: the model itself;
- ``tome:r=<int>``, ``tome:r=<r0>,<r1>,...`` (one per block), ``tome:r=<number>:inflect=<-1..1>``:
  the ToMe re-implementation of tools/tome_baseline.py (the official ``parse_r`` schedules);
- ``diffrate:gflops=<g>`` (a published schedule of tools/schedules/diffrate.json for the model's
  architecture; ``model=ViT-S-DeiT`` picks another) or ``diffrate:prune=<counts>:merge=<counts>``:
  tools/diffrate_baseline.py;
- ``ppt:r=<int>:threshold=<float>:layers=<blocks>`` (defaults: the published 50, 7e-5, 3,6,9):
  tools/ppt_baseline.py;
- ``evit:<key>=<value>:...``: ``evit_patch.apply(model, key=value, ...)``; every key passes through,
  values parsed as int, float, bool, None or comma lists (``evit:layers=3,6,9:keep=0.7``,
  ``evit:flops=0.65``).
- ``calibrated:images=<n>:<key>=<value>:...``: ``evit_patch.calibrate(model, images, key=value, ...)`` on
  ``n`` unlabelled TUNE images (:func:`calibration_images`; never HELD-OUT), its plan applied; the plan
  is searched once per spec and process and reused for timing.

Reported per reducer: MACs counted by ``FlopCounterMode`` on one image (math SDPA backend, so
attention matmuls count; MACs = FLOPs / 2) and their ratio to the original, agreement with the
original's predictions, mean KL(original || reduced) in nats, and top-1 against the manifests'
labels. ``--speed`` adds measured CPU speedups on a random-init DeiT-S beside the FLOP ideal (``--cpu-time``:
one thread, thread CPU time, steadier on a shared machine);
``--plot`` draws the Pareto fronts (needs matplotlib).
With ``--budgets``, ``--speed`` times each chosen spec at batch 1 and 16 on the same DeiT-Tiny (one
thread, thread CPU time) and adds the speedups beside the fraction of the FLOP ideal they reach.

``--budgets`` compares the methods of :data:`BUDGET_METHODS` at matched counted MACs instead: for each
budget (a fraction of the original's MACs), each method's parameters are chosen to land as close as
possible at or below it (the cheapest setting, marked, where none does), and the rows are measured
on the HELD-OUT split (:func:`load_split`). A method with several candidate families (ToMe's
``inflect``) is tuned on the TUNE split: the candidate with the lowest mean KL there is reported.
Logits are cached on disk per spec, split and code version.

    python tools/side_by_side.py original tome:r=13 evit:layers=3,6,9:keep=0.7 --speed --plot pareto.png
    python tools/side_by_side.py --budgets 0.9 0.8 0.65 0.5 0.45 0.4 0.35 --threads 1 --speed
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
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
from diffrate_baseline import apply_diffrate, model_key, published, published_table  # noqa: E402
from ppt_baseline import LAYERS as PPT_LAYERS  # noqa: E402
from ppt_baseline import THRESHOLD as PPT_THRESHOLD  # noqa: E402
from ppt_baseline import R as PPT_R  # noqa: E402
from ppt_baseline import apply_ppt  # noqa: E402
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


def _ints(value, spec: str, key: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) for v in values):
        raise ValueError(f"reducer {spec!r}: {key} must be integers, got {value!r}")
    return values


def _tome(spec: str, options: dict) -> Reducer:
    if "r" not in options or set(options) - {"r", "inflect"}:
        raise ValueError(
            f"reducer {spec!r}: expected tome:r=<int>, tome:r=<r0>,<r1>,... or tome:r=<number>:inflect=<x>"
        )
    r, inflect = options["r"], float(options.get("inflect", 0))
    if isinstance(r, list):
        r = _ints(r, spec, "r")
    elif not isinstance(r, (int, float)) or isinstance(r, bool):
        raise ValueError(f"reducer {spec!r}: r must be a number or a list, got {r!r}")
    return functools.partial(apply_tome, r=r, inflect=inflect)


def _diffrate(spec: str, options: dict) -> Reducer:
    if set(options) == {"prune", "merge"}:
        prune, merge = _ints(options["prune"], spec, "prune"), _ints(options["merge"], spec, "merge")
        return functools.partial(apply_diffrate, prune=prune, merge=merge)
    if "gflops" not in options or set(options) - {"gflops", "model"}:
        raise ValueError(
            f"reducer {spec!r}: expected diffrate:gflops=<g>[:model=<key>] or diffrate:prune=...:merge=..."
        )

    def reduce(model: nn.Module) -> nn.Module:
        prune, merge = published(options.get("model") or model_key(model), options["gflops"])
        return apply_diffrate(model, prune, merge)

    return reduce


def _ppt(spec: str, options: dict) -> Reducer:
    if set(options) - {"r", "threshold", "layers"}:
        raise ValueError(f"reducer {spec!r}: expected ppt:r=<int>:threshold=<float>:layers=<blocks>")
    layers = _ints(options.get("layers", list(PPT_LAYERS)), spec, "layers")
    r = _ints(options.get("r", PPT_R), spec, "r")
    if len(r) != 1:
        raise ValueError(f"reducer {spec!r}: r must be one integer")
    return functools.partial(apply_ppt, r=r[0], threshold=float(options.get("threshold", PPT_THRESHOLD)), layers=layers)


def _evit(spec: str, options: dict) -> Reducer:
    return lambda model: evit_patch.apply(model, **options)


CALIBRATION_SEED = 0
"""Seed of the shuffle of TUNE whose first images ``calibrated:`` specs calibrate on."""
_CALIBRATED: dict[str, dict] = {}
"""``calibrated:`` spec -> the ``apply`` arguments its calibration found (searched once per process)."""


def calibration_images(count: int, shared: Path | None = None) -> torch.Tensor:
    """The first ``count`` images of a seeded shuffle of TUNE: what ``calibrated:`` specs see."""
    tune, _ = load_split("tune", shared or SHARED)
    order = torch.randperm(len(tune), generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    return tune[order[:count]]


def _calibrated(spec: str, options: dict) -> Reducer:
    options = dict(options)
    count = options.pop("images", None)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"reducer {spec!r}: expected calibrated:images=<count>:<calibrate arguments>")

    def reduce(model: nn.Module) -> nn.Module:
        if spec not in _CALIBRATED:
            result = evit_patch.calibrate(model, calibration_images(count), **options)
            _CALIBRATED[spec] = result.apply_kwargs()
        return evit_patch.apply(model, **_CALIBRATED[spec])

    return reduce


def _original(spec: str, options: dict) -> Reducer:
    if options:
        raise ValueError(f"reducer {spec!r}: 'original' takes no options")
    return lambda model: model


KINDS: dict[str, Callable[[str, dict], Reducer]] = {
    "original": _original,
    "tome": _tome,
    "diffrate": _diffrate,
    "ppt": _ppt,
    "evit": _evit,
    "calibrated": _calibrated,
}
"""Spec kind -> ``(spec, options) -> reducer``."""


def parse_reducer(spec: str) -> Reducer:
    """The reducer a spec names (see the module docstring)."""
    kind, *pairs = spec.split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"reducer {spec!r}: expected key=value, got {pair!r}")
        options[key] = parse_value(value)
    if kind not in KINDS:
        raise ValueError(f"reducer {spec!r}: unknown kind {kind!r} ({', '.join(KINDS)})")
    return KINDS[kind](spec, options)


def counted_macs(model: nn.Module, img_size: int = 224) -> float:
    """MACs of one image by ``FlopCounterMode``; the math SDPA backend makes attention matmuls visible.

    The image is fixed noise (seed 0): PPT's count depends a little on the image (pooling adds a
    similarity matmul that pruning does not), and a fixed image makes it reproducible.
    """
    image = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(image)
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
    rows = []
    for name, reduce in reducers.items():
        reduced = reduce(model)
        out = reference if reduced is model else logits(reduced, images)
        macs = counted_macs(reduced)
        agreement, kl, top1 = quality(out, reference, labels)
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


def load_model(shared: Path = SHARED) -> nn.Module:
    """The genuine DeiT-Tiny of ../shared/data (timm ``deit_tiny_patch16_224``, eval mode)."""
    from evit_patch.deploy.weights import create_model

    return create_model("deit_tiny_patch16_224", checkpoint=shared / "weights" / "deit_tiny_patch16_224.safetensors")


@functools.lru_cache(maxsize=4)
def _decoded(manifest: str, shared: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One manifest's images (timm's DeiT eval transform) and labels, decoded once and cached on disk."""
    from timm.data import create_transform, resolve_data_config

    from evit_patch.bench.data import load_images

    transform = create_transform(**resolve_data_config({}, model=timm.create_model("deit_tiny_patch16_224")))
    return load_images(shared / "images" / f"{manifest}.csv", transform)


SPLITS = ("tune", "held-out", "all")
MANIFEST_ROWS = {"imagenet_sample": 750, "imagenet_val": 75}


def split_rows(name: str) -> list[tuple[str, list[int]]]:
    """The fixed splits of the 825 shared images: ``(manifest, 0-based data rows)`` parts, in order.

    - ``"tune"``: the even-indexed rows (0, 2, 4, ...; row 0 is the first after the header) of
      ``imagenet_sample.csv``: 375 images, to choose parameters on;
    - ``"held-out"``: the odd-indexed rows of ``imagenet_sample.csv`` (375), then all 75 rows of
      ``imagenet_val.csv``: 450 images, to report on;
    - ``"all"``: ``imagenet_val`` then ``imagenet_sample``, 825 images (the order of :func:`load_real`).
    """
    sample, val = range(MANIFEST_ROWS["imagenet_sample"]), list(range(MANIFEST_ROWS["imagenet_val"]))
    if name == "tune":
        return [("imagenet_sample", list(sample[0::2]))]
    if name == "held-out":
        return [("imagenet_sample", list(sample[1::2])), ("imagenet_val", val)]
    if name == "all":
        return [("imagenet_val", val), ("imagenet_sample", list(sample))]
    raise ValueError(f"unknown split {name!r} ({', '.join(SPLITS)})")


def load_split(name: str, shared: Path = SHARED) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, 224, 224; timm's DeiT eval transform) and labels (B,) of split ``name`` (:func:`split_rows`)."""
    images, labels = [], []
    for manifest, rows in split_rows(name):
        decoded, truth = _decoded(manifest, Path(shared))
        if len(decoded) != MANIFEST_ROWS[manifest]:
            raise ValueError(f"{manifest}.csv: expected {MANIFEST_ROWS[manifest]} rows, found {len(decoded)}")
        images.append(decoded[rows])
        labels.append(truth[rows])
    return torch.cat(images), torch.cat(labels)


def load_real(shared: Path = SHARED) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The genuine DeiT-Tiny and the 825 images (75 val + 750 sample), decoded once and cached."""
    return load_model(shared), *load_split("all", shared)


@functools.cache
def code_version() -> str:
    """A digest of the code that makes logits (evit_patch, the baselines, the schedules, torch and timm versions)."""
    digest = hashlib.sha256(f"{torch.__version__} {timm.__version__}".encode())
    tools = ROOT / "tools"
    files = sorted((ROOT / "evit_patch").rglob("*.py")) + sorted(tools.glob("*_baseline.py"))
    for path in [*files, tools / "schedules" / "diffrate.json"]:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cached_logits(spec: str, split: str, model: nn.Module, images: torch.Tensor, cache: Path | None) -> torch.Tensor:
    """``logits(parse_reducer(spec)(model), images)``, kept in ``cache`` by spec, split and :func:`code_version`."""
    if cache is None:
        return logits(parse_reducer(spec)(model), images)
    key = hashlib.sha256(f"{spec}|{split}|{len(images)}|{code_version()}".encode()).hexdigest()[:24]
    path = cache / f"{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    out = logits(parse_reducer(spec)(model), images)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(out, partial)
    os.replace(partial, path)
    return out


def quality(out: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """Agreement with the reference's argmax (%), mean KL(reference || out) (nats), top-1 (%)."""
    kl = F.kl_div(out.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean").item()
    agreement = 100 * (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return agreement, kl, 100 * (out.argmax(-1) == labels).float().mean().item()


INFLECTS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)
"""ToMe's ``inflect`` values searched for its best schedule (-1: decreasing r, +1: increasing)."""


@dataclass(frozen=True)
class Method:
    """One method of the ``--budgets`` table; a new method is one more entry of :data:`BUDGET_METHODS`.

    ``families(budget, model)``: lists of specs, each a one-parameter family ordered from most to
    fewest MACs. From each family the spec with the most counted MACs at or below the budget is
    taken (the family's last spec, marked over budget, if none fits); with several families, the
    one of lowest mean KL on the TUNE split is reported.
    """

    name: str
    families: Callable[[float, nn.Module], list[list[str]]]


BUDGET_METHODS = [
    Method("ToMe, constant r", lambda budget, model: [[f"tome:r={r}" for r in range(100)]]),
    Method(
        "ToMe, best (r, inflect) on TUNE",
        lambda budget, model: [[f"tome:r={q / 4:g}:inflect={i:g}" for q in range(400)] for i in INFLECTS],
    ),
    Method(
        "DiffRate, published schedule",
        lambda budget, model: [
            [f"diffrate:gflops={g}" for g in sorted(published_table()[model_key(model)], key=float, reverse=True)]
        ],
    ),
    Method("PPT, blocks 3, 6, 9, threshold 7e-5", lambda budget, model: [[f"ppt:r={r}" for r in range(100)]]),
    Method(
        "EViT exact, blocks 3, 6, 9",
        lambda budget, model: [[f"evit:layers=3,6,9:keep={k / 100:g}" for k in range(99, 0, -1)]],
    ),
    Method(
        "evit_patch merge, flops=",
        lambda budget, model: [[f"evit:flops={budget - d / 1000:g}:method=merge" for d in range(0, 40, 2)]],
    ),
    # Plans at or below the budget by construction (its schedule search fills it): one spec.
    Method("evit_patch dam, flops= (data-free plan)", lambda budget, model: [[f"evit:flops={budget:g}:method=dam"]]),
    Method(
        "evit_patch dam, calibrate() on 32 TUNE images",
        lambda budget, model: [[f"calibrated:images=32:flops={budget:g}:method=dam"]],
    ),
]
BUDGETS = (0.9, 0.8, 0.65, 0.5, 0.45, 0.4, 0.35)


@dataclass(frozen=True)
class BudgetRow:
    budget: float
    method: str
    spec: str
    macs_ratio: float
    over_budget: bool
    """No setting of the method lands at or below the budget: its cheapest is shown."""
    agreement: float
    kl: float
    top1: float
    tune: tuple[float, float, float] | None = None
    """Agreement, KL, top-1 on TUNE, for a method tuned there."""


class MacsRatio:
    """Counted MACs of ``spec``'s model over the original's, counted once per spec (kept in ``cache`` if given)."""

    def __init__(self, model: nn.Module, cache: Path | None = None):
        self.model, self.base = model, counted_macs(model)
        self.path = None if cache is None else cache / f"macs-ratio-{code_version()}.json"
        self.seen = json.loads(self.path.read_text()) if self.path is not None and self.path.is_file() else {}

    def __call__(self, spec: str) -> float:
        if spec not in self.seen:
            try:
                self.seen[spec] = counted_macs(parse_reducer(spec)(self.model)) / self.base
            except Exception as error:  # a setting the method refuses (e.g. too few tokens) never fits
                print(f"{spec}: skipped ({type(error).__name__}: {error})", file=sys.stderr)
                self.seen[spec] = float("inf")
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                partial = self.path.with_suffix(f".{os.getpid()}.tmp")
                partial.write_text(json.dumps(self.seen))
                os.replace(partial, self.path)
        return self.seen[spec]


def pick(family: list[str], budget: float, ratio: Callable[[str], float], window: int = 8) -> tuple[str, bool]:
    """The spec of ``family`` with the most MACs at or below ``budget``, and whether it is over budget.

    Bisection for the first spec at or below the budget (MACs fall along a family), then the best
    of its ``window`` neighbours each side, in case the fall is not strictly monotone. When no spec
    fits: the first spec as cheap as the family's last (e.g. the smallest ``r`` past a cap), over budget.
    """
    cheapest = ratio(family[-1])
    over = cheapest > budget
    target = cheapest if over else budget
    low, high = 0, len(family) - 1  # ratio(family[high]) <= target
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if ratio(family[middle]) > target else (low, middle)
    if over:
        return family[high], True
    near = [s for s in family[max(0, high - window) : high + window + 1] if ratio(s) <= budget]
    return max(near, key=ratio), False


def budget_rows(
    model: nn.Module,
    budgets: tuple[float, ...] = BUDGETS,
    methods: list[Method] = BUDGET_METHODS,
    cache: Path | None = None,
) -> tuple[list[BudgetRow], list[tuple[float, str, str, float, tuple[float, float, float]]]]:
    """The ``--budgets`` rows, measured on HELD-OUT, and every candidate tried on TUNE.

    A candidate: ``(budget, method name, spec, MACs ratio, (agreement, KL, top-1) on TUNE)``.
    """
    ratio = MacsRatio(model, cache)
    held, held_labels = load_split("held-out")
    reference = cached_logits("original", "held-out", model, held, cache)
    rows = [BudgetRow(1.0, "original", "original", 1.0, False, *quality(reference, reference, held_labels))]
    tune_images, tune_labels, tune_reference, tried = None, None, None, []
    for budget in budgets:
        for method in methods:
            picks = [pick(family, budget, ratio) for family in method.families(budget, model)]
            fitting = [spec for spec, over in picks if not over]
            over = not fitting
            candidates = fitting or [min((spec for spec, _ in picks), key=ratio)]
            tune = None
            if len(candidates) > 1:
                if tune_images is None:
                    tune_images, tune_labels = load_split("tune")
                    tune_reference = cached_logits("original", "tune", model, tune_images, cache)
                scored = []
                for spec in candidates:
                    out = cached_logits(spec, "tune", model, tune_images, cache)
                    scored.append((quality(out, tune_reference, tune_labels), spec))
                    tried.append((budget, method.name, spec, ratio(spec), scored[-1][0]))
                tune, chosen = min(scored, key=lambda item: item[0][1])
            else:
                chosen = candidates[0]
            out = cached_logits(chosen, "held-out", model, held, cache)
            row = BudgetRow(
                budget, method.name, chosen, ratio(chosen), over, *quality(out, reference, held_labels), tune
            )
            rows.append(row)
            print(
                f"budget {budget}: {method.name}: {chosen} {row.macs_ratio:.3f}x{' (over budget)' if over else ''}, "
                f"agreement {row.agreement:.1f} %, KL {row.kl:.3f}, top-1 {row.top1:.1f} %",
                file=sys.stderr,
                flush=True,
            )
    return rows, tried


def speedups(
    original: nn.Module,
    chosen: list[tuple[float, str, str]],
    build: Callable[[str], nn.Module],
    run: Callable[[nn.Module, torch.Tensor], object],
    batch_sizes: tuple[int, ...] = (1, 16),
    rounds: int = 5,
    img_size: int = 224,
) -> dict[tuple[float, str], dict[int, float]]:
    """Speedup over ``original`` of each ``(budget, method, spec)`` (``build(spec)`` makes the model,
    ``run(model, x)`` is what is timed), per batch size: one thread, thread CPU time, the original and
    one budget's methods interleaved in each round (``time_interleaved``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    measured: dict[tuple[float, str], dict[int, float]] = {}
    try:
        for budget in sorted({b for b, _, _ in chosen}, reverse=True):
            reduced = {method: build(spec) for b, method, spec in chosen if b == budget}
            for batch_size in batch_sizes:
                x = torch.randn(batch_size, 3, img_size, img_size, dtype=next(original.parameters()).dtype)
                with torch.inference_mode():
                    runners = {n: functools.partial(run, m, x) for n, m in {"original": original, **reduced}.items()}
                    seconds = time_interleaved(runners, rounds=rounds, warmup=1, settle=0, clock=time.thread_time)
                for method in reduced:
                    measured.setdefault((budget, method), {})[batch_size] = seconds["original"] / seconds[method]
            print(f"budget {budget}: timed", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads)
    return measured


def budget_speeds(
    model: nn.Module,
    rows: list[BudgetRow],
    batch_sizes: tuple[int, ...] = (1, 16),
    rounds: int = 5,
    img_size: int = 224,
) -> dict[tuple[float, str], dict[int, float]]:
    """Speedup over the original of each row's chosen spec, per batch size (:func:`speedups` of the forward)."""
    chosen = [(r.budget, r.method, r.spec) for r in rows if r.method != "original"]
    build = lambda spec: parse_reducer(spec)(model)  # noqa: E731
    return speedups(model, chosen, build, lambda m, x: m(x), batch_sizes, rounds, img_size)


def budget_markdown(rows: list[BudgetRow], speeds: dict[tuple[float, str], dict[int, float]] | None = None) -> str:
    batches = sorted({b for timed in (speeds or {}).values() for b in timed})
    timing = "".join(f" batch-{b} speedup (of ideal) |" for b in batches)
    lines = [
        "| budget | method | spec | MACs ratio | agreement % | mean KL | top-1 % |"
        + timing
        + " TUNE: agreement % / KL / top-1 % |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(batches) + " --- |",
    ]
    for r in rows:
        ratio = f"{r.macs_ratio:.3f}x" + (" (over)" if r.over_budget else "")
        tune = "" if r.tune is None else f"{r.tune[0]:.1f} / {r.tune[1]:.3f} / {r.tune[2]:.1f}"
        measured = f"{r.agreement:.1f} | {r.kl:.3f} | {r.top1:.1f}"
        timed = (speeds or {}).get((r.budget, r.method), {})
        cells = "".join(f" {timed[b]:.2f}x ({timed[b] * r.macs_ratio:.2f}) |" if b in timed else " |" for b in batches)
        lines.append(f"| {r.budget:g} | {r.method} | `{r.spec}` | {ratio} | {measured} |{cells} {tune} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reducers", nargs="*", default=DEFAULT_REDUCERS, help="reducer specs (default: %(default)s)")
    parser.add_argument(
        "--speed", nargs="*", default=None, metavar="SPEC", help="time these reducers (none given: all but original)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--cpu-time", action="store_true", help="--speed: one thread, timed in thread CPU time")
    parser.add_argument("--plot", type=Path, default=None, help="Pareto plot PNG (needs matplotlib)")
    parser.add_argument("--split", choices=SPLITS, default="all", help="images to compare specs on (default: all)")
    parser.add_argument(
        "--budgets", nargs="*", type=float, default=None, metavar="FRACTION",
        help=f"compare BUDGET_METHODS at matched MACs on HELD-OUT (none given: {' '.join(map(str, BUDGETS))})",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-cache", action="store_true", help="--budgets: recompute every logit")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.budgets is not None:
        from evit_patch.bench.data import default_cache_dir

        cache = None if args.no_cache else default_cache_dir() / "side_by_side"
        model = load_model()
        rows, tried = budget_rows(model, tuple(args.budgets) or BUDGETS, cache=cache)
        speeds = None if args.speed is None else budget_speeds(model, rows, rounds=args.rounds)
        print("DeiT-Tiny (genuine weights), HELD-OUT split (450 images: odd rows of imagenet_sample + imagenet_val)")
        if speeds is not None:
            print(
                f"Speed: the same model, random inputs, one thread, thread CPU time, {args.rounds} interleaved rounds; "
                "(of ideal): measured speedup x MACs ratio, 1.00 = the FLOP count's promise"
            )
        print()
        print(budget_markdown(rows, speeds))
        if tried:
            print("\nTuned candidates on TUNE (375 images: even rows of imagenet_sample)\n")
            print("| budget | method | spec | MACs ratio | agreement % | mean KL | top-1 % |")
            print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
            for budget, name, spec, ratio, (agreement, kl, top1) in tried:
                print(f"| {budget:g} | {name} | `{spec}` | {ratio:.3f}x | {agreement:.1f} | {kl:.3f} | {top1:.1f} |")
        return
    reducers = {spec: parse_reducer(spec) for spec in args.reducers}
    model = load_model()
    images, labels = load_split(args.split)
    rows = compare(model, reducers, images, labels)
    print(f"DeiT-Tiny (genuine weights), {len(images)} real ImageNet images (split {args.split})\n")
    print(markdown(rows))
    if args.plot is not None:
        plot(rows, args.plot)
    if args.speed is not None:
        timed = args.speed or [spec for spec in args.reducers if spec != "original"]
        print("\nCPU timing, random-init weights, same process (on a shared machine wall time is noisy)\n")
        print(speed({spec: parse_reducer(spec) for spec in timed}, rounds=args.rounds, cpu_time=args.cpu_time))


if __name__ == "__main__":
    main()
