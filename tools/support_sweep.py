"""Apply EViT to every timm model matching some names and say which patch, which are refused, which break.

For maintainers when timm changes: a model should either patch and run (keep 0.7, default layers)
or be refused with an ``EViTError`` that says why; anything else is a bug. Random init, one image
at the model's own input size; very large variants are skipped by default (memory).

    python tools/support_sweep.py                      # vit_*, deit*, beit*, eva*, flexivit*
    python tools/support_sweep.py --names 'eva02_*' --no-skip
"""

from __future__ import annotations

import argparse

import timm
import torch

import evit_patch

SKIP = ("giant", "huge", "large", "gigantic", "enormous", "so400m", "so150m", "bigG", "xlarge", "plus", "sapiens")
SKIP_SIZES = ("_384", "_448", "_512", "_640", "_1024")
SKIP_PARTS = ("_g_", "_e_", "_h_", "_1b", "_2b", "_5b", "_7b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=["vit_*", "deit*", "beit*", "eva*", "flexivit*"])
    parser.add_argument("--no-skip", action="store_true", help="also try the very large variants")
    args = parser.parse_args()
    names = sorted({n for pattern in args.names for n in timm.list_models(pattern)})
    if not args.no_skip:
        names = [n for n in names if not any(s in n for s in SKIP + SKIP_SIZES + SKIP_PARTS)]
    counts = {"patched": 0, "refused": 0, "broken": 0}
    for name in names:
        model = timm.create_model(name, pretrained=False).eval()
        try:
            fast = evit_patch.apply(model, keep=0.7)
            with torch.no_grad():
                fast(torch.randn(1, *model.pretrained_cfg.get("input_size", (3, 224, 224))))
            outcome, detail = "patched", evit_patch.explain(fast).ideal_speedup
            detail = f"ideal speedup {detail:.2f}x"
        except evit_patch.EViTError as error:
            outcome, detail = "refused", str(error)
        except Exception as error:  # anything else is a bug to report
            outcome, detail = "broken", f"{type(error).__name__}: {error}"
        counts[outcome] += 1
        print(f"{outcome:8s} {name}: {detail}", flush=True)
        del model
    print(f"\n{len(names)} models: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
