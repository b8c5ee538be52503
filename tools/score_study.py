"""Alternative score and size-weighted pooling, measured on real weights (docs/supported-models).

Models without a class token rank tokens by the attention they receive (averaged over heads and
queries); average-pooled models weight the fused token by the tokens it stands for. Both choices
are measured here on the genuine DeiT-Tiny and real ImageNet images, the only real weights
available offline:

- token-pooled DeiT-Tiny: [CLS] score (EViT) vs received-attention score;
- the same weights average-pooled (``global_pool='avg'``, per-token norm): size-weighted vs plain
  mean over the surviving tokens, with either score. Absolute accuracy of this variant is low (its
  head was trained on the class token); agreement with its own unpatched self is what counts.

    python tools/score_study.py --checkpoint ../shared/data/weights/deit_tiny_patch16_224.safetensors \\
        --data ../shared/data/images/imagenet_val.csv ../shared/data/images/imagenet_sample.csv
"""

from __future__ import annotations

import argparse

import torch
from timm.data import create_transform, resolve_data_config

import evit_patch
from evit_patch.data import load_images
from evit_patch.evaluate import compare
from evit_patch.reorganizer import Score
from evit_patch.token_track import SizeWeightedTokens
from evit_patch.weights import create_model


def variant(model, layers, keep, score: Score, weighted: bool):
    patched = evit_patch.apply(model, layers=layers, keep=keep)
    for reorganizer in evit_patch.reorganizers(patched):
        reorganizer.score = score
    for module in patched.modules():
        if isinstance(module, SizeWeightedTokens):
            module.weighted = weighted
    return patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", nargs="+", required=True, help="manifest CSVs or ImageFolder trees")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.7, 0.5])
    args = parser.parse_args()
    torch.manual_seed(0)
    token = create_model(args.model, checkpoint=args.checkpoint)
    avg = create_model(args.model, checkpoint=args.checkpoint, global_pool="avg", fc_norm=False)
    transform = create_transform(**resolve_data_config({}, model=token))
    sets = [load_images(path, transform) for path in args.data]
    images, labels = torch.cat([s[0] for s in sets]), torch.cat([s[1] for s in sets])
    rows = []
    for keep in args.keep:
        for pool, model in (("token", token), ("avg", avg)):
            for score in (Score.CLS, Score.RECEIVED):
                for weighted in (True, False) if pool == "avg" else (True,):
                    patched = variant(model, args.layers, keep, score, weighted)
                    c = compare(model, patched, images, labels, progress=False)
                    pooling = "token" if pool == "token" else ("size-weighted" if weighted else "plain mean")
                    rows.append((keep, pool, score.value, pooling, c))
                    print(
                        f"keep {keep} {pool:5s} score={score.value:8s} pool={pooling:13s} "
                        f"agreement {100 * c.agreement:5.1f} %  top-1 {100 * c.top1_original:5.1f} -> "
                        f"{100 * c.top1_patched:5.1f} %  KL {c.mean_kl:.4f}",
                        flush=True,
                    )
    print(f"\n{len(images)} images, layers {args.layers}")
    print("| keep | head | score | pooling | agreement | top-1 original → patched | KL |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for keep, pool, score, pooling, c in rows:
        print(
            f"| {keep} | {pool} | {score} | {pooling} | {100 * c.agreement:.1f} % | "
            f"{100 * c.top1_original:.1f} → {100 * c.top1_patched:.1f} % | {c.mean_kl:.4f} |"
        )


if __name__ == "__main__":
    main()
