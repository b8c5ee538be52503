"""How far patching moves an embedding: the genuine DeiT-Tiny with its classifier removed, 825 real images.

DeiT-Tiny's embedding (``reset_classifier(0)``: the normalised [CLS] token) stands in for the
embedding models whose pretrained weights are not reachable offline (CLIP, SigLIP, DINOv2). For
each plan: its counted MACs, and the mean and minimum cosine between each image's original and
patched embedding (``evit_patch.bench.quality.compare_embeddings``).

    python tools/embedding_cosine.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from side_by_side import load_real  # noqa: E402

import evit_patch  # noqa: E402
from evit_patch.bench.quality import compare_embeddings  # noqa: E402

PLANS = {
    "EViT keep 0.7 @ 3, 6, 9": dict(layers=[3, 6, 9], keep=0.7),
    "merge flops=0.65": dict(flops=0.65, method="merge"),
    "EViT flops=0.5": dict(flops=0.5),
    "merge flops=0.5": dict(flops=0.5, method="merge"),
}


def main() -> None:
    model, images, _ = load_real()
    model.reset_classifier(0)
    print("| plan | MACs | mean cosine | min cosine |\n| --- | --- | --- | --- |")
    for label, options in PLANS.items():
        fast = evit_patch.apply(model, **options)
        report = evit_patch.explain(fast)
        found = compare_embeddings(model, fast, images, progress=False)
        fraction = report.macs_patched / report.macs_original
        print(f"| {label} | {fraction:.3f}x | {found.mean_cosine:.4f} | {found.min_cosine:.4f} |")


if __name__ == "__main__":
    main()
