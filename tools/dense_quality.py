"""Dense outputs of token-reduced models: restored patch features against the original's, at equal MACs.

A token-reduced model can still return the full 14x14 grid of patch features: every original patch
receives the feature of the token that carries it now (``evit_patch.apply(..., dense=True)``:
kept tokens, merge destinations, EViT's fused token; ToMe: *unmerge*, tools/tome_baseline.py).
This measures how good those restored grids are, on the genuine DeiT-Tiny and the real images of
../shared/data, for EViT, merge, dam and ToMe + unmerge at budgets of counted MACs:

1. per-patch cosine similarity of the restored features to the original's after blocks 3, 6, 9
   and 11 (each through the final norm, as ``forward_intermediates(norm=True)`` returns them);
2. dense proxy tasks, "a head trained on the original runs unchanged on the reduced model":
   *foreground*: the target of an image is the original's last-block [CLS] attention over its
   patches (head-averaged), its top half of patches foreground; a logistic-regression probe on the
   original's final patch features is trained on TUNE, frozen, and applied on the reported split to
   the original's features (the ceiling) and to each method's restored ones: mIoU of the two
   classes and accuracy against the target, and agreement with the probe's answers on the
   original; *NN pairs*: for consecutive pairs of images (A, B), each patch of A's nearest
   neighbour (cosine) among B's patches, by original and by restored features: % the same;
   *flip*: each patch's nearest patch of the horizontally mirrored image is its mirror (ground
   truth; the original's own score is the ceiling). Restored patches that share a token tie: a
   patch whose answer is among ``t`` tied patches scores ``1 / t`` (a random pick);
3. backbone speedup: ``forward_intermediates`` at the four blocks, batch 16 and 1, each method
   against the original in the same process, interleaved (one thread, thread CPU time);
4. ``--figure PATH``: a PNG of 3 HELD-OUT images, the original's final features as a PCA-to-RGB map
   (PCA fitted on the original's features of those images) and the same projection of each
   method's restored features at the smallest budget.

Budgets are matched as tools/side_by_side.py matches them (:func:`side_by_side.pick`): each method's
setting with the most counted MACs at or below the budget; for ToMe, of the best setting of each
``inflect`` the one whose restored features are closest to the original's on TUNE (mean cosine
over the four blocks) is reported. TUNE chooses; the reported split (HELD-OUT by default) only reports.

    python tools/dense_quality.py --threads 1 --figure docs/images/dense-pca.png
    python tools/dense_quality.py --quick        # a smoke run: budget 0.5, 32 images, 2 timing rounds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from side_by_side import INFLECTS, MacsRatio, load_split, parse_reducer, pick, speedups  # noqa: E402
from tome_baseline import ToMeBlocks, attention_qkv, cls_attention, tome_intermediates  # noqa: E402
from torch import nn  # noqa: E402

INDICES = (3, 6, 9, 11)
BUDGETS = (0.8, 0.65, 0.5)
METHODS = ("evit", "merge", "dam", "tome")
FOREGROUND = 0.5
"""Fraction of an image's patches, by the original's last-block [CLS] attention, that are foreground."""
FIGURE_IMAGES = ("ILSVRC2012_val_00000025", "ILSVRC2012_val_00000043", "ILSVRC2012_val_00000077")
"""HELD-OUT images of the figure (imagenet_val, the last 75 of HELD-OUT): a clear object on a busy background."""
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def families(method: str, budget: float, inflects=INFLECTS) -> list[list[str]]:
    """Spec families of ``method`` at ``budget`` (see :class:`side_by_side.Method`), most MACs first."""
    if method == "tome":
        return [[f"tome:r={q / 4:g}:inflect={i:g}" for q in range(400)] for i in inflects]
    if method == "dam":  # the searched plan fills the budget from below: one spec
        return [[f"evit:flops={budget:g}:method=dam:dense=true:progress=false"]]
    return [[f"evit:flops={budget - d / 1000:g}:method={method}:dense=true" for d in range(0, 40, 2)]]


def dense_available() -> bool:
    """Whether ``evit_patch.apply`` takes ``dense=True`` and the result has ``forward_intermediates``."""
    import timm

    import evit_patch

    try:
        model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32).eval()
        patched = evit_patch.apply(model, layers=[0], keep=0.7, dense=True)
        grids = patched.forward_intermediates(
            torch.randn(1, 3, 32, 32), indices=[1], norm=True, output_fmt="NLC", intermediates_only=True
        )
    except Exception as error:  # noqa: BLE001 - any failure means: not there yet
        print(f"evit_patch dense API not available: {type(error).__name__}: {error}", file=sys.stderr)
        return False
    return tuple(grids[0].shape) == (1, 4, 192)


def grids(model: nn.Module, x: torch.Tensor, indices=INDICES) -> list[torch.Tensor]:
    """The full-grid image-token features (B, P, C) after ``indices``, through the final norm."""
    if isinstance(getattr(model, "blocks", None), ToMeBlocks):
        return tome_intermediates(model, x, list(indices), norm=True)
    return model.forward_intermediates(x, indices=list(indices), norm=True, output_fmt="NLC", intermediates_only=True)


@torch.inference_mode()
def original_pass(model: nn.Module, images: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The original's grids (one (B, P, C) per index) and its last-block [CLS] attention over patches (B, P)."""
    attn, seen = model.blocks[-1].attn, []
    hook = attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        out = [grids(model, images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    finally:
        hook.remove()
    rows = []
    for x in seen:
        _, q, k, _ = attention_qkv(attn, x, None)
        rows.append(cls_attention(attn, q, k, None).mean(dim=1)[:, model.num_prefix_tokens :])
    return [torch.cat(parts) for parts in zip(*out)], torch.cat(rows)


def foreground(attention: torch.Tensor, fraction: float = FOREGROUND) -> torch.Tensor:
    """Boolean (B, P): each image's ``fraction`` of patches that draw the most [CLS] attention."""
    count = round(fraction * attention.shape[1])
    top = attention.topk(count, dim=1).indices
    return torch.zeros_like(attention, dtype=torch.bool).scatter_(1, top, True)


@dataclass
class Probe:
    """A frozen logistic-regression probe on standardized patch features: ``logits(f) = w . (f - mean) / std + b``."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.std) @ self.weight + self.bias

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Foreground predictions (bool, features' leading shape)."""
        return self.logits(features) > 0


def train_probe(features: torch.Tensor, target: torch.Tensor, steps: int = 200, l2: float = 1e-4) -> Probe:
    """Logistic regression of ``target`` (bool, N) on ``features`` (N, C) by full-batch L-BFGS."""
    features = features.double()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z, y = (features - mean) / std, target.double()
    weight = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(z @ weight + bias, y) + l2 * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return Probe(*(t.detach().float() for t in (mean, std, weight, bias)))


def segmentation(predicted: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """mIoU of the two classes (foreground, background; intersection and union summed over all
    patches and images) and accuracy, both in %, of boolean ``predicted`` against ``target``."""
    ious = []
    for p, t in ((predicted, target), (~predicted, ~target)):
        ious.append((p & t).sum().item() / max((p | t).sum().item(), 1))
    return 100 * sum(ious) / 2, 100 * (predicted == target).float().mean().item()


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch of ``a`` (K, P, C) to every patch of ``b`` (K, Q, C): (K, P, Q)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)


def tie_credit(similarity: torch.Tensor, target: torch.Tensor, tolerance: float = 1e-6) -> float:
    """% of rows of ``similarity`` (..., Q) whose nearest is ``target`` (...), ties broken at random.

    Restored patches that share a token have one feature: they tie, and a row whose target is among
    its ``t`` tied best scores ``1 / t`` (the expected hit rate of a random pick), so a grid that
    collapses many patches into one token is not credited with a guess it cannot make.
    """
    ties = similarity >= similarity.max(dim=-1, keepdim=True).values - tolerance
    hit = ties.gather(-1, target[..., None])[..., 0]
    return 100 * (hit / ties.sum(dim=-1)).mean().item()


def pair_agreement(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Consecutive pairs (A, B) of images: % of A's patches whose nearest patch of B (cosine) by
    ``features`` (N, P, C) is the one it is by ``reference`` (the original's), ties as :func:`tie_credit`."""
    even = len(features) - len(features) % 2
    target = cosines(reference[0:even:2], reference[1:even:2]).argmax(dim=-1)
    return tie_credit(cosines(features[0:even:2], features[1:even:2]), target)


def flip_correspondence(features: torch.Tensor, flipped: torch.Tensor) -> float:
    """% of patches whose nearest patch (cosine) in the horizontally flipped image is their mirror
    image: ``features`` (N, P, C) of the images, ``flipped`` of the flipped images (a 16-pixel patch
    grid mirrors onto itself), ties as :func:`tie_credit`."""
    side = int(features.shape[1] ** 0.5)
    mirror = torch.arange(side * side).reshape(side, side).flip(1).flatten()
    return tie_credit(cosines(features, flipped), mirror.expand(len(features), -1))


@dataclass(frozen=True)
class Choice:
    budget: float
    method: str
    spec: str
    macs_ratio: float
    over_budget: bool


@dataclass(frozen=True)
class DenseRow:
    choice: Choice
    cosine: tuple[float, ...]
    """Mean per-patch cosine to the original after each of :data:`INDICES`."""
    miou: float
    accuracy: float
    agreement: float
    """% of patches where the probe answers as it does on the original's features."""
    pairs: float
    """:func:`pair_agreement` of the final features."""
    flip: float
    """:func:`flip_correspondence` of the final features."""


def measure(
    restored: list[torch.Tensor],
    flipped: torch.Tensor,
    reference: list[torch.Tensor],
    target: torch.Tensor,
    probe: Probe,
    choice: Choice,
) -> DenseRow:
    """One :class:`DenseRow`: ``restored``, the method's grids after :data:`INDICES`, ``flipped``, its final
    grid of the flipped images, ``reference``, the original's grids, ``target``, the foreground masks."""
    cosine = tuple(F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item() for a, b in zip(restored, reference))
    predicted, ceiling = probe(restored[-1]), probe(reference[-1])
    miou, accuracy = segmentation(predicted, target)
    agreement = 100 * (predicted == ceiling).float().mean().item()
    pairs, flip = pair_agreement(restored[-1], reference[-1]), flip_correspondence(restored[-1], flipped)
    return DenseRow(choice, cosine, miou, accuracy, agreement, pairs, flip)


@torch.inference_mode()
def method_grids(model: nn.Module, images: torch.Tensor, batch_size: int, indices=INDICES) -> list[torch.Tensor]:
    """:func:`grids` of ``images``, in batches."""
    parts = [grids(model, images[i : i + batch_size], indices) for i in range(0, len(images), batch_size)]
    return [torch.cat(p) for p in zip(*parts)]


class Built:
    """``parse_reducer(spec)(model)``, built once per spec (a searched ``dam`` plan takes a while)."""

    def __init__(self, model: nn.Module):
        self.model, self.models = model, {}

    def __call__(self, spec: str) -> nn.Module:
        if spec not in self.models:
            self.models[spec] = parse_reducer(spec)(self.model)
        return self.models[spec]


def choose(
    build: Built,
    method: str,
    budget: float,
    ratio: MacsRatio,
    tune: tuple[torch.Tensor, list[torch.Tensor]] | None,
    batch_size: int,
    inflects=INFLECTS,
) -> tuple[Choice, list[tuple[str, float, float]]]:
    """``method``'s setting at ``budget``, and ``(spec, MACs ratio, TUNE mean cosine)`` of each candidate tried."""
    picks = [pick(group, budget, ratio, window=3) for group in families(method, budget, inflects)]
    fitting = [spec for spec, over in picks if not over]
    candidates = fitting or [min((spec for spec, _ in picks), key=ratio)]
    tried = []
    if len(candidates) > 1 and tune is not None:
        images, reference = tune
        for spec in candidates:
            restored = method_grids(build(spec), images, batch_size)
            build.models.pop(spec)  # candidates are many: keep only the chosen
            score = sum(F.cosine_similarity(a, b, dim=-1).mean().item() for a, b in zip(restored, reference)) / len(
                reference
            )
            tried.append((spec, ratio(spec), score))
            print(f"  TUNE {spec}: {ratio(spec):.3f}x, mean cosine {score:.4f}", file=sys.stderr, flush=True)
        spec = max(tried, key=lambda item: item[2])[0]
    else:
        spec = candidates[0]
    return Choice(budget, method, spec, ratio(spec), not fitting), tried


def speeds(
    build: Built, choices: list[Choice], batch_sizes=(16, 1), rounds: int = 5
) -> dict[tuple[float, str], dict[int, float]]:
    """Backbone speedup (``forward_intermediates`` at :data:`INDICES`) of each choice over the
    original, per batch size (``side_by_side.speedups``: one thread, thread CPU time, interleaved)."""
    chosen = [(c.budget, c.method, c.spec) for c in choices]
    return speedups(build.model, chosen, build, grids, tuple(batch_sizes), rounds)


def pca_rgb(reference: torch.Tensor, others: list[torch.Tensor]) -> list[torch.Tensor]:
    """``reference`` (B, P, C) and each of ``others`` projected on the reference's first 3 principal
    axes, each axis scaled to [0, 1] by the reference's 1st and 99th percentiles: (B, P, 3) each."""
    flat = reference.reshape(-1, reference.shape[-1]).double()
    mean = flat.mean(0)
    _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    axes = vh[:3].T
    projected = (flat - mean) @ axes
    low, high = projected.quantile(0.01, dim=0), projected.quantile(0.99, dim=0)

    def rgb(features: torch.Tensor) -> torch.Tensor:
        out = ((features.double() - mean) @ axes - low) / (high - low)
        return out.clamp(0, 1).float()

    return [rgb(reference), *(rgb(f) for f in others)]


def figure(images: torch.Tensor, maps: list[torch.Tensor], captions: list[str], panel: int = 140):
    """A PIL image: one row per image; its picture, then one PCA map (B, P, 3) per column of ``maps``."""
    from PIL import Image, ImageDraw

    side, header = int(maps[0].shape[1] ** 0.5), 18
    columns = 1 + len(maps)
    sheet = Image.new("RGB", (columns * panel, header + len(images) * panel), "white")
    draw = ImageDraw.Draw(sheet)
    for column, caption in enumerate(["image", *captions]):
        draw.text((column * panel + 4, 3), caption, fill="black")

    def to_pil(chw: torch.Tensor) -> Image.Image:
        array = (chw.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(array)

    for row, picture in enumerate(images):
        top = header + row * panel
        picture = picture * STD[:, None, None] + MEAN[:, None, None]
        sheet.paste(to_pil(picture).resize((panel, panel), Image.BICUBIC), (0, top))
        for column, grid in enumerate(maps, start=1):
            tile = grid[row].reshape(side, side, 3).permute(2, 0, 1)
            sheet.paste(to_pil(tile).resize((panel, panel), Image.NEAREST), (column * panel, top))
    return sheet


def figure_indices(split: str, names=FIGURE_IMAGES) -> list[int]:
    """Positions of ``names`` (imagenet_val files, no extension) in the HELD-OUT split."""
    import csv

    from side_by_side import SHARED, split_rows

    if split != "held-out":
        raise ValueError("--figure draws HELD-OUT images: use --split held-out")
    offset, positions = 0, {}
    for manifest, rows in split_rows(split):
        files = [r["file"] for r in csv.DictReader(open(SHARED / "images" / f"{manifest}.csv"))]
        for position, index in enumerate(rows):
            positions[(manifest, Path(files[index]).stem)] = offset + position
        offset += len(rows)
    return [positions[("imagenet_val", name)] for name in names]


def cosine_markdown(ceiling_rows: list[DenseRow], rows: list[DenseRow]) -> str:
    blocks = " | ".join(f"block {i}" for i in INDICES)
    lines = [
        f"| budget | method | spec | MACs ratio | {blocks} | mean |",
        "| ---: | --- | --- | ---: |" + " ---: |" * (len(INDICES) + 1),
    ]
    for r in [*ceiling_rows, *rows]:
        c = r.choice
        ratio = f"{c.macs_ratio:.3f}x" + (" (over)" if c.over_budget else "")
        cells = " | ".join(f"{v:.4f}" for v in r.cosine)
        lines.append(
            f"| {c.budget:g} | {c.method} | `{c.spec}` | {ratio} | {cells} | {sum(r.cosine) / len(r.cosine):.4f} |"
        )
    return "\n".join(lines)


def proxy_markdown(rows: list[DenseRow], timed: dict | None) -> str:
    batches = sorted({b for t in (timed or {}).values() for b in t})
    timing = "".join(f" batch-{b} speedup |" for b in batches)
    lines = [
        "| budget | method | MACs ratio | FLOP ideal | probe mIoU % | probe accuracy % | agreement with probe "
        "on original % | NN pairs % | flip % |" + timing,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(batches),
    ]
    for r in rows:
        c = r.choice
        got = (timed or {}).get((c.budget, c.method), {})
        cells = "".join(f" {got[b]:.2f}x |" if b in got else " |" for b in batches)
        lines.append(
            f"| {c.budget:g} | {c.method} | {c.macs_ratio:.3f}x | {1 / c.macs_ratio:.2f}x | {r.miou:.1f} | "
            f"{r.accuracy:.1f} | {r.agreement:.1f} | {r.pairs:.1f} | {r.flip:.1f} |" + cells
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("held-out", "tune"), default="held-out", help="images reported on")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS), help="MAC fractions")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="smoke run: budget 0.5, 32 images, 2 inflects")
    parser.add_argument("--figure", type=Path, default=None, help="write the PCA figure (PNG) here")
    parser.add_argument("--no-speed", action="store_true", help="skip the timing")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the quality passes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-cache", action="store_true", help="recount every MACs ratio")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from side_by_side import load_model

    from evit_patch.bench.data import default_cache_dir

    started = time.perf_counter()
    inflects, limit = INFLECTS, None
    if args.quick:
        args.budgets, inflects, limit, args.rounds = [0.5], (-0.5, 0.0), 32, 2
    methods = list(args.methods)
    if any(m != "tome" for m in methods) and not dense_available():
        methods = [m for m in methods if m == "tome"]
        print("evit_patch has no dense=True yet: only ToMe + unmerge is measured", file=sys.stderr)

    model = load_model()
    tune_images, _ = load_split("tune")
    images, _ = load_split(args.split)
    shown_images = images[figure_indices(args.split)] if args.figure is not None else None
    if limit:
        tune_images, images = tune_images[:limit], images[:limit]
    tune_reference, tune_attention = original_pass(model, tune_images, args.batch_size)
    reference, attention = original_pass(model, images, args.batch_size)
    probe = train_probe(
        tune_reference[-1].reshape(-1, tune_reference[-1].shape[-1]), foreground(tune_attention).flatten()
    )
    target = foreground(attention)
    tune_fit = segmentation(probe(tune_reference[-1]), foreground(tune_attention))
    print(f"probe fit on TUNE: mIoU {tune_fit[0]:.1f} %, accuracy {tune_fit[1]:.1f} %", file=sys.stderr)

    cache = None if args.no_cache else default_cache_dir() / "dense_quality"
    ratio, build = MacsRatio(model, cache), Built(model)
    final = (INDICES[-1],)
    flipped = method_grids(model, images.flip(-1), args.batch_size, final)[0]
    original = Choice(1.0, "original", "original", 1.0, False)
    ceiling = measure(reference, flipped, reference, target, probe, original)
    rows, tried, figure_specs = [], [], {}
    for budget in args.budgets:
        for method in methods:
            choice, candidates = choose(
                build, method, budget, ratio, (tune_images, tune_reference), args.batch_size, inflects
            )
            tried += [(budget, method, *c) for c in candidates]
            restored = method_grids(build(choice.spec), images, args.batch_size)
            flipped = method_grids(build(choice.spec), images.flip(-1), args.batch_size, final)[0]
            rows.append(measure(restored, flipped, reference, target, probe, choice))
            r = rows[-1]
            print(
                f"budget {budget}: {method}: {choice.spec} {choice.macs_ratio:.3f}x, cosine "
                + " ".join(f"{v:.3f}" for v in r.cosine)
                + f", mIoU {r.miou:.1f}, agreement {r.agreement:.1f}, pairs {r.pairs:.1f}, flip {r.flip:.1f}",
                file=sys.stderr,
                flush=True,
            )
            if budget == min(args.budgets):
                figure_specs[method] = choice.spec
    timed = None if args.no_speed else speeds(build, [r.choice for r in rows], rounds=args.rounds)

    print(f"DeiT-Tiny (genuine weights), {args.split.upper()} split ({len(images)} images); probe trained on TUNE")
    print(f"({len(tune_images)} images); features through the final norm, restored to the full 14x14 grid.\n")
    print("Per-patch cosine similarity of restored to original features (mean over patches and images)\n")
    print(cosine_markdown([ceiling], rows))
    print(
        f"\nDense proxies: foreground = top {FOREGROUND:.0%} of patches by the original's last-block [CLS] "
        "attention, linear probe frozen after TUNE; NN pairs: consecutive image pairs, each patch's nearest patch "
        "of the other image the original's (%); flip: each patch's nearest patch of the mirrored image its mirror "
        "(%, ground truth); ties among patches sharing a token credited 1/ties"
    )
    if timed is not None:
        print(f"Speed: forward_intermediates at blocks {INDICES}, one thread, thread CPU time, {args.rounds} rounds")
    print()
    print(proxy_markdown([ceiling, *rows], timed))
    if tried:
        print("\nToMe candidates on TUNE (mean cosine over the four blocks; the highest is reported)\n")
        print("| budget | method | spec | MACs ratio | TUNE mean cosine |")
        print("| ---: | --- | --- | ---: | ---: |")
        for budget, method, spec, macs, score in tried:
            print(f"| {budget:g} | {method} | `{spec}` | {macs:.3f}x | {score:.4f} |")
    if args.figure is not None:
        shown = [m for m in METHODS if m in figure_specs]
        with torch.inference_mode():
            original = grids(model, shown_images)[-1]
            restored = [grids(build(figure_specs[m]), shown_images)[-1] for m in shown]
        maps = pca_rgb(original, restored)
        names = {"evit": "EViT", "merge": "merge", "dam": "dam", "tome": "ToMe+unmerge"}
        captions = ["original"] + [f"{names[m]} {ratio(figure_specs[m]):.2f}x" for m in shown]
        figure(shown_images, maps, captions).save(args.figure, optimize=True)
        print(f"\nfigure: {args.figure}")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
