"""Batch-1 and batch-16 speed of exact EViT, merging and dam against the FLOP ideal (docs/training-free.md).

Random-init DeiT-S (speed does not depend on weights), one thread, thread CPU time, the original and
every variant interleaved; dam runs the plans the genuine DeiT-Tiny of ../shared/data gets at 0.65x
and 0.5x (same depth and token counts). ``--compile``: every model through ``torch.compile``
(``ONLY="dam 0.5,dam 0.65"`` limits the variants, as each compile takes minutes on CPU).
``--dense``: each variant also patched with ``dense=True`` (the owners of every patch carried), and
the cost of carrying them printed as the plain variant's time over the dense one's.

Each eager variant is also timed against its *bound*: the original blocks run at the variant's token
counts, cut by a slice (a reduction that costs nothing). "of bound" is what the variant keeps of that:
the FLOP ideal is out of reach at batch 1 even for the bound, as smaller matrices run less
efficiently, so "of bound" is the share of the reachable speedup that the reorganization leaves.

    python tools/batch_speed.py
    ONLY="dam 0.65,dam 0.5" python tools/batch_speed.py --compile
    python tools/batch_speed.py --dense
"""

import functools
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import evit_patch  # noqa: E402
from evit_patch.bench.speed import time_interleaved  # noqa: E402
from evit_patch.deploy.weights import create_model  # noqa: E402

SHARED = Path(os.environ.get("EVIT_PATCH_SHARED", ROOT.parent / "shared" / "data"))
torch.set_num_threads(1)
torch.manual_seed(0)
compiled = "--compile" in sys.argv
dense = "--dense" in sys.argv
tiny = create_model("deit_tiny_patch16_224", checkpoint=SHARED / "weights" / "deit_tiny_patch16_224.safetensors")
m = timm.create_model("deit_small_patch16_224").eval()


def macs(model):
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
        model(torch.randn(1, 3, 224, 224))
    return c.get_total_flops() / 2


variants = {"evit 3,6,9 keep 0.7": evit_patch.apply(m, layers=[3, 6, 9], keep=0.7)}
for f in (0.65, 0.5):
    cfg = evit_patch.plan(tiny, flops=f, method="dam", **({"dense": True} if dense else {}))
    print(
        f"dam plan at {f}: layers {list(cfg.layers)} keep {[round(k, 3) for k in cfg.keep]} cls_only {cfg.cls_only}",
        flush=True,
    )
    variants[f"dam {f}"] = evit_patch.apply(m, layers=cfg.layers, keep=cfg.keep, method="dam", cls_only=cfg.cls_only)
    variants[f"merge {f}"] = evit_patch.apply(m, flops=f, method="merge")
if dense:  # the same plans, carrying the owners (dam without cls_only, which dense leaves out)
    for name, model in list(variants.items()):
        cfg = evit_patch.get_config(model)
        options = {**cfg.options(), "cls_only": False, "dense": True}
        variants[f"{name} dense"] = evit_patch.apply(m, layers=cfg.layers, keep=cfg.keep, **options)
        if cfg.cls_only:  # compare like with like: the plain plan without cls_only
            options["dense"] = False
            variants[name] = evit_patch.apply(m, layers=cfg.layers, keep=cfg.keep, **options)


class Truncated(torch.nn.Module):
    """The original model at a patched model's token counts, cut by a slice after each attention:
    what a reduction costing nothing would run (``timm`` ViT blocks: attention, slice, MLP)."""

    def __init__(self, model, patched):
        super().__init__()
        self.model, self.counts = model, [r.tokens_out for r in evit_patch.explain(patched).rows]

    def forward(self, x):
        m = self.model
        x = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        for block, count in zip(m.blocks, self.counts):
            x = (x + block.drop_path1(block.ls1(block.attn(block.norm1(x)))))[:, :count]
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return m.forward_head(m.norm(x))


base = macs(m)
ideal = {k: base / macs(v) for k, v in variants.items()}
bounds = {} if compiled else {k: Truncated(m, v) for k, v in variants.items()}
models = {"orig": m, **variants, **{f"{k} bound": v for k, v in bounds.items()}}
if compiled:
    only = os.environ.get("ONLY")
    if only:
        variants = {k: v for k, v in variants.items() if k in only.split(",")}
        models = {"orig": m, **variants}
    models = {k: torch.compile(v, dynamic=False) for k, v in models.items()}
for bs in (1, 16):
    x = torch.randn(bs, 3, 224, 224)
    with torch.inference_mode():
        runners = {k: functools.partial(v, x) for k, v in models.items()}
        t = time_interleaved(runners, rounds=15 if bs == 1 else 5, warmup=2, settle=0, clock=time.thread_time)
    for k in variants:
        s = t["orig"] / t[k]
        bound = f", bound {t['orig'] / t[f'{k} bound']:.3f}x, of bound {t[f'{k} bound'] / t[k]:.3f}" if bounds else ""
        print(
            f"{'compiled' if compiled else 'eager'} batch {bs:2d} {k:20s}: {s:.3f}x, ideal {ideal[k]:.3f}x, "
            f"of ideal {s / ideal[k]:.3f}{bound}  (orig {t['orig'] * 1e3:.1f} ms)",
            flush=True,
        )
    for k in (k for k in variants if k.endswith(" dense")):
        plain = k.removesuffix(" dense")
        print(f"batch {bs:2d} {plain:20s}: dense costs {t[k] / t[plain]:.3f}x the plain time", flush=True)
