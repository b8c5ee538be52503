"""Which schedule does the data-free probe pick, and how good is that pick on real images?

For each budget, every candidate of the searched schedule family (:mod:`evit_patch.planning.schedule`)
is scored by its KL to the original on dead-leaves probes (24 images at seeds 0 and 1, and 64 at
seed 0) and on real TUNE images (every other one of the 375: nothing here reads HELD-OUT), with
the genuine DeiT-Tiny and ``method="dam"``. The lines starting ``==`` say what each probe picks and
what the best pick on TUNE would have been (docs/training-free.md, "Where it still loses").

    python tools/probe_study.py --budgets 0.35 0.4 0.45 0.5 0.65 0.8
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
from side_by_side import load_model, load_split  # noqa: E402

from evit_patch.config import EViTConfig, PlanOptions  # noqa: E402
from evit_patch.families import find_family  # noqa: E402
from evit_patch.planning.explain import CostModel  # noqa: E402
from evit_patch.planning.objective import Objective  # noqa: E402
from evit_patch.planning.probe import probe_images  # noqa: E402
from evit_patch.planning.schedule import candidates, reads_prefix_only  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.35, 0.4, 0.45, 0.5, 0.65, 0.8])
    parser.add_argument("--threads", type=int, default=1)
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
    objectives = {name: Objective(model, images, 32, every) for name, images in probes.items()}
    real = Objective(model, tune[::2], 64, every)  # 188 TUNE images
    for budget in args.budgets:
        rows = []
        for config in candidates(cost, every, budget * cost.macs_original, range(0, depth // 2 + 1)):
            kl, agreement = real(config.layers, config.keep)[:2]
            row = {"start": config.layers[0], "keep": [round(k, 3) for k in config.keep], "kl": kl, "agree": agreement}
            row |= {name: objective(config.layers, config.keep)[0] for name, objective in objectives.items()}
            rows.append(row)
            probe_kls = ", ".join(f"{row[name]:.4f}" for name in objectives)
            head = f"{budget} start {row['start']} keep {row['keep'][:3]}"
            print(f"{head}: TUNE {kl:.4f} / {agreement:.3f}; probes {probe_kls}")
        best = min(rows, key=lambda r: r["kl"])
        for name in objectives:
            pick = min(rows, key=lambda r: r[name])
            print(
                f"== {budget} {name} picks start {pick['start']} {pick['keep'][:2]}: TUNE KL {pick['kl']:.4f}, "
                f"agreement {pick['agree']:.3f}; best on TUNE: start {best['start']} {best['keep'][:2]}, "
                f"KL {best['kl']:.4f}, agreement {best['agree']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
