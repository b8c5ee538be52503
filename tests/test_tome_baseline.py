"""tools/tome_baseline.py (ToMe re-implementation, a benchmark baseline) on a random-init tiny ViT."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import images, make_vit

sys.path.append(str(Path(__file__).resolve().parents[1] / "tools"))  # after everything: tools/ names shadow nothing

from tome_baseline import apply_tome, block  # noqa: E402


def tiny():
    return make_vit("vit_tiny_patch16_224", depth=4, img_size=64)  # 16 patches + [CLS]


@torch.inference_mode()
def test_r0_is_the_original_and_nothing_is_touched():
    model, x = tiny(), images(2, 64)
    merged = apply_tome(model, r=0)
    assert torch.equal(merged(x), model(x))
    assert merged.state_dict().keys() == model.state_dict().keys()
    assert type(model.blocks) is torch.nn.Sequential  # the caller's model is not modified


@torch.inference_mode()
def test_each_block_merges_r_tokens():
    merged, seen = apply_tome(tiny(), r=2), []
    for blk in merged.blocks:
        blk.attn.qkv.register_forward_hook(lambda m, args, out: seen.append(("attn", args[0].shape[1])))
        blk.mlp.register_forward_hook(lambda m, args, out: seen.append(("mlp", args[0].shape[1])))
    out = merged(images(2, 64))
    assert out.shape == (2, 1000)
    assert seen == [pair for n in (17, 15, 13, 11) for pair in (("attn", n), ("mlp", n - 2))]


def reference_block(blk, x, size, r):
    """One ToMe block written out by hand: proportional attention, matching by loops, weighted merge."""
    attn, (batch, n, channels) = blk.attn, x.shape
    qkv = blk.norm1(x) @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / attn.head_dim**0.5 + size[:, None, None, :, 0].log()
    heads = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, channels)
    x = x + heads @ attn.proj.weight.T + attn.proj.bias
    keys = k.mean(1)
    outputs, sizes = [], []
    for b in range(batch):
        cos = torch.nn.functional.cosine_similarity
        edges = []  # (similarity, A token, its best B token); [CLS] (token 0) is never merged
        for i in range(2, n, 2):
            sims = {j: cos(keys[b, i], keys[b, j], dim=0).item() for j in range(1, n, 2)}
            j = max(sims, key=sims.get)
            edges.append((sims[j], i, j))
        moved = sorted(edges, reverse=True)[:r]
        total = {j: (x[b, j] * size[b, j], size[b, j].clone()) for j in range(1, n, 2)}
        for _, i, j in moved:
            total[j] = (total[j][0] + x[b, i] * size[b, i], total[j][1] + size[b, i])
        gone = {i for _, i, _ in moved}
        kept = [i for i in range(0, n, 2) if i not in gone]
        outputs.append(torch.stack([x[b, i] for i in kept] + [s / w for s, w in total.values()]))
        sizes.append(torch.stack([size[b, i] for i in kept] + [w for _, w in total.values()]))
    x, size = torch.stack(outputs), torch.stack(sizes)
    return x + blk.mlp(blk.norm2(x)), size


@torch.inference_mode()
def test_one_block_matches_a_by_hand_reference_with_sizes():
    blk = apply_tome(tiny(), r=3).blocks[1]
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 15, 192, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 5, (2, 15, 1), generator=generator).double()
    x[:, 0] = x[:, 1]  # [CLS] is its neighbour's twin: the best edge of all, unless [CLS] is protected
    got_x, got_size = block(blk, x, size, r=3)
    want_x, want_size = reference_block(blk, x, size, r=3)
    assert got_x.shape == (2, 12, 192)
    torch.testing.assert_close(got_size, want_size, rtol=0, atol=0)
    torch.testing.assert_close(got_x, want_x, rtol=1e-10, atol=1e-10)
    assert got_size.sum() == size.sum()  # every patch is still counted once
