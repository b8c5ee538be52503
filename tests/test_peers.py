"""The published peers in tools/ (DiffRate, PPT, ToMe schedules) and side_by_side.py, on a random-init tiny ViT.

References here are written independently of the tools: per image, with Python loops, dicts and
explicit softmax attention, in float64.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest
import torch
from conftest import images, make_vit

sys.path.append(str(Path(__file__).resolve().parents[1] / "tools"))  # after everything: tools/ names shadow nothing

import diffrate_baseline  # noqa: E402
import ppt_baseline  # noqa: E402
from diffrate_baseline import apply_diffrate, published, published_table  # noqa: E402
from ppt_baseline import apply_ppt  # noqa: E402
from tome_baseline import apply_tome, schedule  # noqa: E402

_path = list(sys.path)
from side_by_side import BudgetRow, budget_markdown, budget_speeds, parse_reducer, pick, split_rows  # noqa: E402

sys.path[:] = _path  # side_by_side puts tools/ first; its names (evaluate, benchmark, ...) must shadow nothing

cos = torch.nn.functional.cosine_similarity


def tiny():
    return make_vit("vit_tiny_patch16_224", depth=4, img_size=64)  # 16 patches + [CLS]


def token_counts(model, x):
    """``[(tokens into attention, tokens into the MLP)]`` per block."""
    seen = []
    for blk in model.blocks:
        blk.attn.qkv.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
        blk.mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    with torch.inference_mode():
        model(x)
    return list(zip(seen[0::2], seen[1::2]))


@pytest.mark.parametrize(
    "reduce",
    [
        lambda m: apply_diffrate(m, [17] * 4, [17] * 4),
        lambda m: apply_diffrate(m, [197] * 4, [197] * 4),  # more than there are: nothing to do
        lambda m: apply_ppt(m, r=0, layers=[0, 1, 2, 3]),
        lambda m: apply_tome(m, r=[0, 0, 0, 0]),
        lambda m: apply_tome(m, r=0.5, inflect=0.5),  # the schedule truncates to all zeros
    ],
    ids=["diffrate-17", "diffrate-197", "ppt-r0", "tome-list-0", "tome-inflect-0"],
)
@torch.inference_mode()
def test_a_keep_all_schedule_is_the_original_exactly_and_nothing_is_touched(reduce):
    model, x = tiny(), images(2, 64)
    reduced = reduce(model)
    assert torch.equal(reduced(x), model(x))
    assert reduced.state_dict().keys() == model.state_dict().keys()
    assert type(model.blocks) is torch.nn.Sequential  # the caller's model is not modified


def test_diffrate_token_counts_follow_the_schedule():
    # block 2: prune 15 > the 13 left, merge 12 < 13; block 3: prune 10, merge 11 > 10 (no merge)
    reduced = apply_diffrate(tiny(), prune=[17, 15, 15, 10], merge=[17, 13, 12, 11])
    assert token_counts(reduced, images(2, 64)) == [(17, 17), (17, 13), (13, 12), (12, 10)]


@pytest.mark.parametrize("threshold", [0.0, float("inf")], ids=["all-prune", "all-pool"])
def test_ppt_token_counts_follow_r_at_its_layers_capped_at_half(threshold):
    reduced = apply_ppt(tiny(), r=5, threshold=threshold, layers=[1, 2])
    assert token_counts(reduced, images(2, 64)) == [(17, 17), (17, 12), (12, 7), (7, 7)]  # block 2: min(5, 11 // 2)


def test_tome_schedule_is_the_official_parse_r():
    # values of facebookresearch/ToMe tome.utils.parse_r(12, (r, inflect)) at commit af95e4b
    assert schedule(12, 8, -0.5) == [12, 11, 10, 9, 9, 8, 7, 6, 6, 5, 4, 4]
    assert schedule(12, 8, 1.0) == [0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16]
    assert schedule(12, 8, -1.0) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert schedule(12, 13) == [13] * 12
    assert schedule(12, [4, 3]) == [4, 3] + [0] * 10
    merged = apply_tome(tiny(), r=[3, 0, 2, 5])
    assert token_counts(merged, images(2, 64)) == [(17, 14), (14, 14), (14, 12), (12, 7)]  # 5 capped at (12 - 1) // 2


def attend(blk, x, size):
    """Explicit attention: the new residual stream, probabilities (B, heads, N, N) and v (B, heads, N, d)."""
    attn, (batch, n, channels) = blk.attn, x.shape
    qkv = blk.norm1(x) @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    probs = (q @ k.transpose(-1, -2) / attn.head_dim**0.5 + size[:, None, None, :, 0].log()).softmax(-1)
    heads = (probs @ v).transpose(1, 2).reshape(batch, n, channels)
    return x + heads @ attn.proj.weight.T + attn.proj.bias, probs, k, v


def reference_diffrate_block(blk, x, size, prune, merge):
    x, probs, _, _ = attend(blk, x, size)
    n, outputs, sizes = x.shape[1], [], []
    for b in range(len(x)):
        importance = {j: probs[b, :, 0, j].mean().item() for j in range(1, n)}
        survivors = [0] + sorted(importance, key=importance.get, reverse=True)[: min(n, prune) - 1]
        kept, merged = survivors[:merge], survivors[merge:]
        groups = {i: [x[b, i]] for i in kept}
        weight = {i: size[b, i].clone() for i in kept}
        for j in merged:
            similarity = {i: cos(x[b, j], x[b, i], dim=0).item() for i in kept if i != 0}
            i = max(similarity, key=similarity.get)
            groups[i].append(x[b, j])
            weight[i] = weight[i] + size[b, j] * similarity[i]
        outputs.append(torch.stack([torch.stack(groups[i]).mean(0) for i in kept]))
        sizes.append(torch.stack([weight[i] for i in kept]))
    x, size = torch.stack(outputs), torch.stack(sizes)
    return x + blk.mlp(blk.norm2(x)), size


@torch.inference_mode()
def test_one_diffrate_block_matches_a_by_hand_reference_with_sizes():
    blk = apply_diffrate(tiny(), [17] * 4, [17] * 4).blocks[1]
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 15, 192, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 5, (2, 15, 1), generator=generator).double()
    got_x, got_size = diffrate_baseline.block(blk, x, size, prune=11, merge=6)
    want_x, want_size = reference_diffrate_block(blk, x, size, prune=11, merge=6)
    assert got_x.shape == (2, 6, 192)
    torch.testing.assert_close(got_size, want_size, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_x, want_x, rtol=1e-10, atol=1e-10)


def reference_pool(x, keys, size, r):
    """ToMe's bipartite soft matching of one image by loops: (tokens, sizes) in ToMe's output order."""
    n = len(x)
    edges = []  # (similarity, A token, its best B token); [CLS] (token 0, in A) is never merged
    for i in range(2, n, 2):
        sims = {j: cos(keys[i], keys[j], dim=0).item() for j in range(1, n, 2)}
        j = max(sims, key=sims.get)
        edges.append((sims[j], i, j))
    moved = sorted(edges, reverse=True)[:r]
    total = {j: (x[j] * size[j], size[j].clone()) for j in range(1, n, 2)}
    for _, i, j in moved:
        total[j] = (total[j][0] + x[i] * size[i], total[j][1] + size[i])
    gone = {i for _, i, _ in moved}
    kept = [i for i in range(0, n, 2) if i not in gone]
    tokens = [x[i] for i in kept] + [s / w for s, w in total.values()]
    return torch.stack(tokens), torch.stack([size[i] for i in kept] + [w for _, w in total.values()])


def reference_scores(probs, v, b):
    """ATS significance of image ``b``'s tokens 1..N-1: [CLS] attention summed over heads x value norm, sum 1."""
    n = probs.shape[-1]
    raw = [probs[b, :, 0, j].sum().item() * v[b, :, j].flatten().norm().item() for j in range(1, n)]
    return {j: s / sum(raw) for j, s in zip(range(1, n), raw)}


def reference_ppt_block(blk, x, size, r, threshold):
    x, probs, k, v = attend(blk, x, size)
    n, outputs, sizes, pooled = x.shape[1], [], [], []
    for b in range(len(x)):
        scores = reference_scores(probs, v, b)
        pooled.append(statistics.variance(scores.values()) < threshold)
        if pooled[-1]:
            tokens, weights = reference_pool(x[b], k[b].mean(0), size[b], r)
        else:
            kept = [0] + sorted(scores, key=scores.get, reverse=True)[: n - 1 - r]  # in descending score order
            tokens, weights = x[b, kept], size[b, kept]
        outputs.append(tokens)
        sizes.append(weights)
    x, size = torch.stack(outputs), torch.stack(sizes)
    return x + blk.mlp(blk.norm2(x)), size, pooled


@torch.inference_mode()
def test_one_ppt_block_matches_a_by_hand_reference_one_image_pooled_one_pruned():
    blk = apply_ppt(tiny(), r=0, layers=[1]).blocks[1]
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 15, 192, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 5, (2, 15, 1), generator=generator).double()
    x[:, 0] = x[:, 1]  # [CLS] is its neighbour's twin: the best edge of all, unless [CLS] is protected
    _, probs, _, v = attend(blk, x, size)
    variance = [statistics.variance(reference_scores(probs, v, b).values()) for b in range(2)]
    assert variance[0] != variance[1]
    threshold = sum(variance) / 2  # the image of lower variance pools, the other is pruned
    got_x, got_size, got_pooled = ppt_baseline.block(blk, x, size, r=4, threshold=threshold)
    want_x, want_size, want_pooled = reference_ppt_block(blk, x, size, 4, threshold)
    assert sorted(want_pooled) == [False, True] and got_pooled.tolist() == want_pooled
    assert got_x.shape == (2, 11, 192)
    torch.testing.assert_close(got_size, want_size, rtol=0, atol=0)
    torch.testing.assert_close(got_x, want_x, rtol=1e-10, atol=1e-10)


def test_the_published_diffrate_schedules_are_read_from_the_data_file():
    prune, merge = published("ViT-T-DeiT", 0.8)
    assert prune == [197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3]  # compression_rate.json, commit 91ae3e3
    assert merge == [197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3]
    assert sorted(published_table()["ViT-T-DeiT"], key=float) == ["0.6", "0.7", "0.8", "0.9", "1.0"]
    with pytest.raises(KeyError, match="0.6, 0.7, 0.8, 0.9, 1.0 GFLOPs, not 0.65"):
        published("ViT-T-DeiT", 0.65)


def test_specs_build_the_reducers_they_name():
    model = tiny()
    tome = parse_reducer("tome:r=4:inflect=-0.5")(model).blocks
    assert tome.r == schedule(4, 4, -0.5) == [6, 4, 3, 2]
    assert parse_reducer("tome:r=1,2,3,0")(model).blocks.r == [1, 2, 3, 0]
    ppt = parse_reducer("ppt:r=3:threshold=1e-4:layers=1,2")(model).blocks
    assert (ppt.r, ppt.threshold, ppt.layers) == (3, 1e-4, (1, 2))
    diffrate = parse_reducer("diffrate:prune=17,16,15,14:merge=17,15,13,11")(model).blocks
    assert (diffrate.prune, diffrate.merge) == ([17, 16, 15, 14], [17, 15, 13, 11])
    with pytest.raises(ValueError, match="layers must be block indices in 0..3, got \\[3, 6, 9\\]"):
        parse_reducer("ppt")(model)  # the published blocks 3, 6, 9 do not exist in a depth-4 model


def test_a_calibrated_spec_applies_what_calibrate_finds_on_tune_images_once_per_spec(monkeypatch):
    import side_by_side

    import evit_patch

    model, seen = tiny(), []
    calibration = images(4, size=64, seed=3)

    def fake_tune(count, shared=None):
        seen.append(count)
        return calibration[:count]

    monkeypatch.setattr(side_by_side, "calibration_images", fake_tune)
    monkeypatch.setattr(side_by_side, "_CALIBRATED", {})
    spec = "calibrated:images=3:flops=0.7:max_evaluations=4:progress=false"
    reduced = parse_reducer(spec)(model)
    again = parse_reducer(spec)(model)  # the plan is searched once per spec
    assert seen == [3]
    result = evit_patch.calibrate(model, calibration[:3], flops=0.7, max_evaluations=4, progress=False)
    direct = evit_patch.apply(model, **result.apply_kwargs())
    x = images(2, size=64, seed=4)
    with torch.inference_mode():
        torch.testing.assert_close(reduced(x), direct(x), rtol=0, atol=0)
        torch.testing.assert_close(again(x), direct(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected calibrated:images=<count>"):
        parse_reducer("calibrated:flops=0.5")


def test_the_splits_are_fixed_disjoint_and_cover_the_825_images():
    tune, held, every = split_rows("tune"), split_rows("held-out"), split_rows("all")
    assert tune == [("imagenet_sample", list(range(0, 750, 2)))]
    assert held == [("imagenet_sample", list(range(1, 750, 2))), ("imagenet_val", list(range(75)))]
    pairs = {
        name: {(m, i) for m, rows in parts for i in rows} for name, parts in [("t", tune), ("h", held), ("a", every)]
    }
    assert len(pairs["t"]) == 375 and len(pairs["h"]) == 450 and not pairs["t"] & pairs["h"]
    assert pairs["t"] | pairs["h"] == pairs["a"] and len(pairs["a"]) == 825


def test_pick_takes_the_most_macs_at_or_below_the_budget():
    ratios = {"a": 1.0, "b": 0.9, "c": 0.81, "d": 0.8, "e": 0.79, "f": 0.7}
    assert pick(list(ratios), 0.8, ratios.get) == ("d", False)
    assert pick(list(ratios), 0.85, ratios.get) == ("c", False)
    assert pick(list(ratios), 0.5, ratios.get) == ("f", True)  # none fits: the cheapest, over budget
    capped = {"r=1": 0.9, "r=2": 0.8, "r=3": 0.7, "r=4": 0.7}  # r past a cap changes nothing
    assert pick(list(capped), 0.5, capped.get) == ("r=3", True)
    bumpy = {"a": 1.0, "b": 0.84, "c": 0.86, "d": 0.7}  # not strictly falling: the neighbours are looked at
    assert pick(list(bumpy), 0.9, bumpy.get) == ("c", False)


def test_budget_speeds_time_every_chosen_spec_at_each_batch_size_and_the_table_shows_them():
    model = tiny()
    rows = [
        BudgetRow(1.0, "original", "original", 1.0, False, 100.0, 0.0, 50.0),
        BudgetRow(0.5, "EViT", "evit:layers=1:keep=0.5", 0.6, False, 90.0, 0.1, 40.0),
        BudgetRow(0.5, "ToMe", "tome:r=4", 0.55, False, 91.0, 0.09, 41.0),
    ]
    speeds = budget_speeds(model, rows, batch_sizes=(1, 2), rounds=1, img_size=64)
    assert set(speeds) == {(0.5, "EViT"), (0.5, "ToMe")}
    assert all(set(timed) == {1, 2} and all(v > 0 for v in timed.values()) for timed in speeds.values())
    table = budget_markdown(rows, speeds).splitlines()
    assert "batch-1 speedup (of ideal)" in table[0] and "batch-2 speedup (of ideal)" in table[0]
    evit = speeds[(0.5, "EViT")][2]
    assert f"{evit:.2f}x ({evit * 0.6:.2f})" in table[3]  # the fraction of the FLOP ideal: speedup x MACs ratio
    assert table[2].count("|") == table[0].count("|")  # the original's row keeps the columns, empty
