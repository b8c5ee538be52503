"""How long ``evit_patch.apply`` takes on DeiT-S (random init, one thread): min and median of 5.

Run it in two checkouts to compare versions (each in its own process):

    python tools/patch_time.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402

import evit_patch  # noqa: E402

CASES = {
    "keep 0.7 @ 3, 6, 9": dict(layers=[3, 6, 9], keep=0.7),
    "flops=0.65": dict(flops=0.65),
    "flops=0.65, img_size=288": dict(flops=0.65, img_size=288),
}


def main() -> None:
    torch.set_num_threads(1)
    model = timm.create_model("deit_small_patch16_224").eval()
    evit_patch.apply(model, layers=[3, 6, 9], keep=0.7)  # warm-up: imports, first trace
    for label, options in CASES.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            evit_patch.apply(model, **options)
            times.append(time.perf_counter() - start)
        print(f"{label}: min {min(times):.2f} s, median {statistics.median(times):.2f} s")


if __name__ == "__main__":
    main()
