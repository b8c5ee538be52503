"""Which schedule does the data-free probe pick, and how good is that pick on real images?

For each budget, every candidate of the searched schedule family (:mod:`evit_patch.planning.schedule`)
is scored by its KL to the original on dead-leaves probes (24 images at seeds 0 and 1, and 64 at
seed 0) and on real TUNE images (every other one of the 375: nothing here reads HELD-OUT), with
the genuine DeiT-Tiny and ``method="dam"``. The lines starting ``==`` say what each probe picks and
what the best pick on TUNE would have been (docs/training-free.md, "Where it still loses").

``--texture A``: also textured dead leaves (1/f noise of standard deviation ``A`` added over the
image, so every disc carries texture; seeds 0 and 1). ``--distances``: each probe also picks by
three other distances than KL:
``1 -`` cosine of the pre-logits features, ``1 -`` top-5 overlap, and KL at temperature 4.
``--dense``: each probe also picks by what ``dense=True`` plans are compared by, ``1 -`` the mean
per-patch cosine of the last block's tokens restored to the grid. ``--invert N``: also dead leaves
optimised for ``N`` Adam steps toward confident predictions of random classes (model inversion, as
data-free quantisation does; jittered, with a smoothness penalty).

    python tools/probe_study.py --budgets 0.35 0.4 0.45 0.5 0.65 0.8
    python tools/probe_study.py --budgets 0.35 0.45 0.5 0.65 --texture 0.15 --distances
    python tools/probe_study.py --budgets 0.35 0.4 0.45 0.5 0.65 0.8 --dense --invert 10 30
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from side_by_side import load_model, load_split  # noqa: E402

from evit_patch.config import EViTConfig, PlanOptions  # noqa: E402
from evit_patch.families import find_family  # noqa: E402
from evit_patch.graph.state import set_keep  # noqa: E402
from evit_patch.planning.explain import CostModel  # noqa: E402
from evit_patch.planning.objective import Objective  # noqa: E402
from evit_patch.planning.probe import IMAGENET_MEAN, IMAGENET_STD, dead_leaves, probe_images  # noqa: E402
from evit_patch.planning.schedule import candidates, reads_prefix_only  # noqa: E402


def textured(amplitude: float, seed: int, count: int = 24, size: int = 224) -> torch.Tensor:
    """Dead leaves with 1/f texture (standard deviation ``amplitude``) added, normalised as DeiT expects."""
    white = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed + 1000))
    radius = (torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.rfftfreq(size)[None, :] ** 2).sqrt()
    radius[0, 0] = 1.0
    noise = torch.fft.irfft2(torch.fft.rfft2(white) / radius, s=(size, size))
    noise = (noise - noise.mean(dim=(-2, -1), keepdim=True)) / noise.std(dim=(-2, -1), keepdim=True)
    images = (dead_leaves(count, (size, size), 3, seed=seed) + amplitude * noise).clamp(0, 1)
    return (images - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def inverted(model, images: torch.Tensor, steps: int, seed: int = 0) -> torch.Tensor:
    """``images`` after ``steps`` Adam steps (lr 0.05) of cross-entropy toward random classes, with random
    shifts of up to 8 pixels and flips, and a squared-gradient smoothness penalty (weight 0.05)."""
    generator = torch.Generator().manual_seed(seed + 7)
    targets = torch.randint(0, model.num_classes, (len(images),), generator=generator)
    x = images.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        dx, dy = torch.randint(-8, 9, (2,), generator=generator).tolist()
        shifted = torch.roll(x, (dx, dy), (2, 3))
        shifted = shifted.flip(3) if torch.rand(1, generator=generator).item() < 0.5 else shifted
        smooth = (x.diff(dim=2) ** 2).mean() + (x.diff(dim=3) ** 2).mean()
        loss = F.cross_entropy(model(shifted), targets) + 0.05 * smooth
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return x.detach()


def outputs(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre-logits features, logits)`` of a timm classifier."""
    with torch.inference_mode():
        features = torch.cat([model.forward_head(model.forward_features(x), pre_logits=True) for x in images.split(32)])
        return features, model.head(features)


def distances(reference, patched, images: torch.Tensor) -> dict[str, float]:
    """KL, ``1 -`` cosine of the pre-logits features, ``1 -`` top-5 overlap and KL at temperature 4."""
    (features, logits), (ref_features, ref_logits) = outputs(patched, images), reference

    def kl(temperature):
        out, ref = (logits / temperature).log_softmax(-1), (ref_logits / temperature).log_softmax(-1)
        return F.kl_div(out, ref, log_target=True, reduction="none").sum(-1).mean().item()

    top5 = (logits.topk(5).indices[..., None] == ref_logits.topk(5).indices[..., None, :]).any(-1).float().mean()
    cosine = F.cosine_similarity(features, ref_features).mean().item()
    return {"KL": kl(1.0), "1-cos": 1 - cosine, "1-top5": 1 - top5.item(), "KL(T=4)": kl(4.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.35, 0.4, 0.45, 0.5, 0.65, 0.8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--texture", type=float, default=None, help="also textured dead leaves of this amplitude")
    parser.add_argument("--distances", action="store_true", help="also pick by three other distances than KL")
    parser.add_argument("--dense", action="store_true", help="also pick by the restored last block's tokens")
    parser.add_argument("--invert", nargs="*", type=int, default=[], help="also model-inverted probes, these steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()
    tune, _ = load_split("tune")
    family = find_family(model)
    options = PlanOptions.build(method="dam")
    options = dataclasses.replace(options, cls_only=reads_prefix_only(model, family))
    cost = CostModel.of(model)
    depth = cost.num_blocks
    every = EViTConfig.build(range(depth), 1.0, options, num_blocks=depth)
    probes = {
        "dead leaves, 24, seed 0": probe_images(model, (224, 224), 3, count=24, seed=0),
        "dead leaves, 24, seed 1": probe_images(model, (224, 224), 3, count=24, seed=1),
        "dead leaves, 64, seed 0": probe_images(model, (224, 224), 3, count=64, seed=0),
    }
    if args.texture is not None:
        probes |= {f"textured {args.texture}, 24, seed {seed}": textured(args.texture, seed) for seed in (0, 1)}
    probes |= {f"inverted {steps} steps, 24, seed 0": inverted(model, probes["dead leaves, 24, seed 0"], steps)
               for steps in args.invert}  # fmt: skip
    objectives = {name: Objective(model, images, 32, every) for name, images in probes.items()}
    if args.dense:
        dense = dataclasses.replace(options, cls_only=False, dense=True)
        dense_every = EViTConfig.build(range(depth), 1.0, dense, num_blocks=depth)
        objectives |= {(name, "dense"): Objective(model, probes[name], 32, dense_every) for name in list(objectives)}
    real = Objective(model, tune[::2], 64, every)  # 188 TUNE images
    references = {name: outputs(model, images) for name, images in probes.items()} if args.distances else {}
    for budget in args.budgets:
        rows = []
        for config in candidates(cost, every, budget * cost.macs_original, range(0, depth // 2 + 1)):
            kl, agreement = real(config.layers, config.keep)[:2]
            row = {"start": config.layers[0], "keep": [round(k, 3) for k in config.keep], "kl": kl, "agree": agreement}
            row |= {name: objective(config.layers, config.keep)[0] for name, objective in objectives.items()}
            if args.distances:
                per_block = dict(zip(config.layers, config.keep))
                for name in probes:
                    objective = objectives[name]
                    set_keep(objective.patched, [per_block.get(i, 1.0) for i in range(depth)])
                    found = distances(references[name], objective.patched, probes[name])
                    row |= {(name, distance): value for distance, value in found.items()}
            rows.append(row)
            probe_kls = ", ".join(f"{row[name]:.4f}" for name in objectives)
            head = f"{budget} start {row['start']} keep {row['keep'][:3]}"
            print(f"{head}: TUNE {kl:.4f} / {agreement:.3f}; probes {probe_kls}")
        best = min(rows, key=lambda r: r["kl"])
        picks = [*objectives] + [k for k in rows[0] if isinstance(k, tuple) and k not in objectives]
        for name in picks:
            pick = min(rows, key=lambda r: r[name])
            label = name if isinstance(name, str) else f"{name[0]} by {name[1]}"
            print(
                f"== {budget} {label} picks start {pick['start']} {pick['keep'][:2]}: TUNE KL {pick['kl']:.4f}, "
                f"agreement {pick['agree']:.3f}; best on TUNE: start {best['start']} {best['keep'][:2]}, "
                f"KL {best['kl']:.4f}, agreement {best['agree']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
