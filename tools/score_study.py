"""Alternative score and size-weighted pooling, measured on real weights (docs/supported-models).

Models without a class token rank tokens by the attention they receive (averaged over heads and
queries); average-pooled models weight the fused token by the tokens it stands for. Both choices
are measured here on the genuine DeiT-Tiny and real ImageNet images, the only real weights
available offline:

- token-pooled DeiT-Tiny: [CLS] score (EViT) vs received-attention score;
- the same weights average-pooled, with the final norm before the mean (``fc_norm=False``, as
  ``vit_*_gap_*``) or after it (``fc_norm=True``, as BEiT and EVA-02): the fused token as a
  score-weighted mean or EViT's raw weighted sum, counted by its size or as one token in the mean,
  with either score. Its head was trained on the class token, so
  its logits mean nothing (top-1 under 1 %); what is compared is the pooled feature the head
  would read: cosine similarity and relative error against the unpatched model's.

    python tools/score_study.py --checkpoint ../shared/data/weights/deit_tiny_patch16_224.safetensors \\
        --data ../shared/data/images/imagenet_val.csv ../shared/data/images/imagenet_sample.csv
"""

from __future__ import annotations

import argparse

import torch
from timm.data import create_transform, resolve_data_config

import evit_patch
from evit_patch.bench.data import load_images
from evit_patch.bench.quality import compare
from evit_patch.deploy.weights import create_model, load_state_dict
from evit_patch.options import Score
from evit_patch.reductions import EViT
from evit_patch.token_state import SizeWeightedTokens

POOLINGS = {  # name: (fuse_mean, size-weighted)
    "fused mean, size-weighted (shipped)": (True, True),
    "fused mean, plain mean": (True, False),
    "EViT fused sum, size-weighted": (False, True),
    "EViT fused sum, plain mean": (False, False),
}


class PlainMean(torch.nn.Module):
    """Stand-in for the final norm's size weights: a plain mean over the surviving tokens."""

    def forward(self, x, sizes, num_prefix_tokens):
        return x


def variant(model, layers, keep, score: Score, weighted: bool, fuse_mean: bool = False):
    patched = evit_patch.apply(model, layers=layers, keep=keep)
    for reorganizer in evit_patch.reorganizers(patched):
        reorganizer.score = score
        reorganizer.reduction = EViT(fuse=True, mean=fuse_mean)
    for module in patched.modules():
        if not weighted and isinstance(getattr(module, "evit_pool", None), SizeWeightedTokens):
            module.evit_pool = PlainMean()
    return patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", nargs="+", required=True, help="manifest CSVs or ImageFolder trees")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument(
        "--heads", nargs="+", default=["token", "avg", "avg_fc_norm"], choices=["token", "avg", "avg_fc_norm"]
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    token = create_model(args.model, checkpoint=args.checkpoint)
    avg_heads = {
        "avg": create_model(args.model, checkpoint=args.checkpoint, global_pool="avg", fc_norm=False),
        "avg_fc_norm": norm_after_mean(args.model, args.checkpoint),
    }
    transform = create_transform(**resolve_data_config({}, model=token))
    sets = [load_images(path, transform) for path in args.data]
    images, labels = torch.cat([s[0] for s in sets]), torch.cat([s[1] for s in sets])
    token_rows, avg_rows = [], []
    references = {head: pooled(avg_heads[head], images) for head in args.heads if head != "token"}
    for keep in args.keep:
        for score in (Score.CLS, Score.RECEIVED):
            if "token" in args.heads:
                c = compare(token, variant(token, args.layers, keep, score, True), images, labels, progress=False)
                token_rows.append((keep, score.value, c))
                print(f"keep {keep} token head, {score.value}: agreement {100 * c.agreement:.1f} %", flush=True)
            for head, reference in references.items():
                for pooling, (fuse_mean, weighted) in POOLINGS.items():
                    got = pooled(variant(avg_heads[head], args.layers, keep, score, weighted, fuse_mean), images)
                    cosine = torch.nn.functional.cosine_similarity(got, reference, dim=-1).mean().item()
                    error = ((got - reference).norm(dim=-1) / reference.norm(dim=-1)).mean().item()
                    avg_rows.append((keep, head, score.value, pooling, cosine, error))
                    print(f"keep {keep} {head}, {score.value}, {pooling}: cosine {cosine:.4f}", flush=True)
    print(f"\n{len(images)} images, layers {args.layers}\n")
    print("| keep | score | agreement | top-1 original → patched | KL |")
    print("| --- | --- | --- | --- | --- |")
    for keep, score, c in token_rows:
        print(
            f"| {keep} | {score} | {100 * c.agreement:.1f} % | "
            f"{100 * c.top1_original:.1f} → {100 * c.top1_patched:.1f} % | {c.mean_kl:.4f} |"
        )
    print("\n| keep | head | score | fused token, pooling | cosine to original | relative error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for keep, head, score, pooling, cosine, error in avg_rows:
        print(f"| {keep} | {head} | {score} | {pooling} | {cosine:.4f} | {error:.3f} |")


def norm_after_mean(name: str, checkpoint: str):
    """The weights average-pooled with their final norm applied after the mean (``fc_norm``)."""
    model = create_model(name, global_pool="avg", fc_norm=True)
    state = load_state_dict(checkpoint)
    state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.inference_mode()
def pooled(model, images, batch_size: int = 64) -> torch.Tensor:
    """The pooled feature the head reads (after ``fc_norm``), batch by batch."""
    parts = [
        model.forward_head(model.forward_features(images[i : i + batch_size]), pre_logits=True)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts).double()


if __name__ == "__main__":
    main()
