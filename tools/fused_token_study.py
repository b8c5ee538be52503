"""Why exact EViT loses accuracy without fine-tuning: what its fused token does downstream.

On the genuine DeiT-Tiny and the real images of ../shared/data, EViT at keep 0.7 @ 3, 6, 9. At
each reorganizing block, a hook on the reorganizer's ``published`` module sees the scores and the
tokens; printed per block, averaged over images:

- mass: the [CLS] attention the dropped tokens had (sum of their scores): what the fused token
  stands for;
- next score: the [CLS] attention the fused token draws at the next reorganizing block (a token
  standing for ``s`` patches that drew their share would draw about ``mass``);
- kept again: how often that next block keeps the fused token rather than fusing it again;
- norm ratio: the fused token's norm over the median norm of the kept tokens (EViT fuses with the
  raw weights, so the fused token is ``mass`` times a typical token, before the next norm).

    python tools/fused_token_study.py --images 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import torch  # noqa: E402
from side_by_side import load_real  # noqa: E402

import evit_patch  # noqa: E402


def study(model, images, layers=(3, 6, 9), keep=0.7, batch_size=64) -> list[dict]:
    fast = evit_patch.apply(model, layers=list(layers), keep=keep)
    rows = {layer: {"mass": [], "next_score": [], "kept_again": [], "norm_ratio": []} for layer in layers}
    seen: list = []

    def hook(module, args, output):
        out, scores, _ = args
        seen.append((module, out, scores))

    owners = {m.published: m for m in evit_patch.reorganizers(fast)}
    handles = [p.register_forward_hook(lambda p, a, o: hook(owners[p], a, o)) for p in owners]
    with torch.inference_mode():
        for x in images.split(batch_size):
            seen.clear()
            fast(x)
            for i, (module, out, scores) in enumerate(seen):
                kept = out.kept_index
                dropped_mass = scores.sum(1) - scores.gather(1, kept).sum(1)
                tokens = out.tokens[:, module.num_prefix_tokens :]
                norms = tokens.norm(dim=-1)
                rows[module.layer]["mass"].append(dropped_mass)
                rows[module.layer]["norm_ratio"].append(norms[:, -1] / norms[:, :-1].median(dim=1).values)
                if i + 1 < len(seen):
                    _, later, later_scores = seen[i + 1]
                    rows[module.layer]["next_score"].append(later_scores[:, -1])
                    last = later_scores.shape[1] - 1
                    rows[module.layer]["kept_again"].append((later.kept_index == last).any(1).float())
    for h in handles:
        h.remove()
    return [
        {"layer": layer, **{k: torch.cat(v).mean().item() if v else float("nan") for k, v in r.items()}}
        for layer, r in rows.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=825, help="how many of the 825 real images")
    parser.add_argument("--keep", type=float, default=0.7)
    args = parser.parse_args()
    model, images, _ = load_real()
    print(f"EViT keep {args.keep} @ 3, 6, 9 on {min(args.images, len(images))} real images (genuine DeiT-Tiny)\n")
    print("| block | dropped mass | fused token's score at the next block | kept there | norm / median kept |")
    print("| --- | --- | --- | --- | --- |")
    for r in study(model, images[: args.images], keep=args.keep):
        print(
            f"| {r['layer']} | {r['mass']:.3f} | {r['next_score']:.3f} | {100 * r['kept_again']:.0f} % | "
            f"{r['norm_ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
