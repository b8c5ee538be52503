"""Attention-pooled heads: what weighing a fused token by its size buys, and the CPU speedup.

A ViT-S-sized transformers ``SiglipVisionModel`` (hidden 384, 12 layers, 6 heads, 224 px, patch
16), random-init (no SigLIP weights are reachable offline), on real images when ``--data`` is given
(else random ones). For keep 0.7 at blocks 3, 6, 9, EViT and merging: cosine similarity of the
patched ``pooler_output`` with the original's, with the size-aware probe (shipped) and with it
switched off (every token counted once); then one thread, CPU time of the
original and each patched model, timed in one process by ``time_interleaved``, against the FLOP
ideal from ``explain``.

    python tools/attention_pool_study.py --data ../shared/data/images/imagenet_val.csv
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import evit_patch
from evit_patch.bench.speed import time_interleaved


def siglip_small(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.SiglipVisionConfig(
        image_size=224,
        patch_size=16,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        attn_implementation="sdpa",
    )
    return transformers.SiglipVisionModel(config).eval()


def _images(data: str | None, count: int) -> torch.Tensor:
    if data is None:
        return torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    from timm.data import create_transform

    from evit_patch.bench.data import load_images

    transform = create_transform(224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # SigLIP's normalisation
    return load_images(data, transform)[0][:count]


class CountedOnce(torch.nn.Module):
    """Stand-in for the head's size bias: every token counted once in the probe's softmax."""

    def forward(self, sizes, like):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="an images manifest (CSV), e.g. ../shared/data/images/imagenet_val.csv")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, x = siglip_small(), _images(args.data, args.images)
    plan = dict(layers=[3, 6, 9], keep=0.7)
    patched = {method: evit_patch.apply(model, method=method, **plan) for method in ("evit", "merge")}
    with torch.no_grad():
        original = model(x).pooler_output
        for method, fast in patched.items():
            cosines = []
            size_aware = fast.head.evit_bias
            for bias in (size_aware, CountedOnce()):
                fast.head.evit_bias = bias
                cosines.append(F.cosine_similarity(fast(x).pooler_output, original).mean().item())
            fast.head.evit_bias = size_aware
            print(f"{method}: cosine with the original, size-aware {cosines[0]:.4f}, counted once {cosines[1]:.4f}")
    batch = x[:8]
    runners = {"original": lambda: model(batch)} | {m: (lambda f=f: f(batch)) for m, f in patched.items()}
    with torch.inference_mode():
        times = time_interleaved(runners, rounds=args.rounds, clock=time.thread_time)
    for method, fast in patched.items():
        ideal = evit_patch.explain(fast).ideal_speedup
        speedup = times["original"] / times[method]
        print(f"{method}: speedup {speedup:.2f}x (FLOP ideal {ideal:.2f}x), batch 8, 1 thread")


if __name__ == "__main__":
    main()
