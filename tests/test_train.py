"""The fine-tuning building blocks: schedules, loss, data and sampler, checkpoints. No timing asserted."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, make_vit
from PIL import Image

import evit_patch
from evit_patch.errors import CheckpointError
from evit_patch.train import checkpoint
from evit_patch.train.data import (
    ResumableBatches,
    TrainImages,
    check_labels,
    find_images,
    train_transform,
)
from evit_patch.train.loop import TrainConfig, build_optimizer, keeps_every_token
from evit_patch.train.loss import UNLABELLED, distillation, finetune_loss
from evit_patch.train.schedule import keep_at, lr_at


def write_images(root, classes=("a", "b"), per_class=3, size=40, flat=False):
    """Small deterministic RGB PNGs: an ImageFolder tree, or a flat folder with ``flat``."""
    rng = np.random.default_rng(0)
    paths = []
    for c in classes:
        folder = root if flat else root / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{c}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


# -- schedules ---------------------------------------------------------------------------------


def test_keep_warmup_follows_evit_cosine():
    # keep = t + (1 - t) * (1 + cos(pi * s / W)) / 2 with W = 4
    expected = {
        0: [1.0, 1.0],
        1: [0.7 + 0.3 * (1 + math.cos(math.pi / 4)) / 2, 0.5 + 0.5 * (1 + math.cos(math.pi / 4)) / 2],
        2: [0.85, 0.75],
        3: [0.7 + 0.3 * (1 - math.cos(math.pi / 4)) / 2, 0.5 + 0.5 * (1 - math.cos(math.pi / 4)) / 2],
        4: [0.7, 0.5],
        100: [0.7, 0.5],
    }
    for step, keep in expected.items():
        assert keep_at(step, [0.7, 0.5], 4) == pytest.approx(keep, abs=1e-15), step
    assert keep_at(1, [0.7, 0.5], 4) == pytest.approx([0.95606602, 0.92677670])
    assert keep_at(0, [0.7], 0) == [0.7]


def test_lr_linear_warmup_then_cosine():
    values = [lr_at(s, 1e-3, total_steps=10, warmup_steps=2, min_lr=1e-5) for s in (0, 1, 2, 6, 10, 12)]
    half = 1e-5 + 0.5 * (1e-3 - 1e-5)
    assert values == pytest.approx([5e-4, 1e-3, 1e-3, half, 1e-5, 1e-5], abs=1e-15)


def test_default_warmups_are_fractions_of_the_run():
    assert TrainConfig().resolved(100) == (5, 50)
    assert TrainConfig(warmup_steps=0, keep_warmup=7).resolved(100) == (0, 7)


def test_keep_warmup_drives_a_patched_model_without_retracing():
    model = evit_patch.apply(make_vit(dtype=torch.float32, img_size=32), layers=[3, 6, 9], keep=0.5)
    blocks = [model.blocks[i] for i in (3, 6, 9)]
    evit_patch.set_keep(model, keep_at(2, [0.5, 0.5, 0.5], 4))
    assert evit_patch.get_config(model).keep == (0.75, 0.75, 0.75)
    assert [model.blocks[i] for i in (3, 6, 9)] == blocks


def test_a_step_that_keeps_every_token_is_recognised():
    model = evit_patch.apply(make_vit(dtype=torch.float32, depth=4), layers=[1, 2, 3], keep=0.7)  # 196 tokens
    evit_patch.set_keep(model, 0.999)  # ceil(0.999 * 196) = 196: every token kept
    assert keeps_every_token(model)
    evit_patch.set_keep(model, [1.0, 1.0, 0.99])  # ceil(0.99 * 196) = 195 at block 3
    assert not keeps_every_token(model)


# -- loss --------------------------------------------------------------------------------------


def test_distillation_is_temperature_scaled_kl():
    s, t = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)), torch.randn(3, 10)
    temp = 2.0
    p = (t / temp).softmax(-1)
    manual = (p * (p.log() - (s / temp).log_softmax(-1))).sum(-1).mean() * temp**2
    assert distillation(s, t, temp) == pytest.approx(manual.item(), rel=1e-6)
    assert distillation(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_cross_entropy_counts_labelled_images_only():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    labels = torch.tensor([3, UNLABELLED, 7, UNLABELLED])
    parts = finetune_loss(s, t, labels, ce_weight=0.5)
    assert parts.ce.item() == pytest.approx(F.cross_entropy(s[[0, 2]], labels[[0, 2]]).item(), rel=1e-6)
    assert parts.total.item() == pytest.approx(parts.distill.item() + 0.5 * parts.ce.item(), rel=1e-6)
    assert finetune_loss(s, t, torch.full((4,), UNLABELLED)).ce.item() == 0.0
    assert finetune_loss(s, t, None).total.item() == pytest.approx(distillation(s, t).item())


def test_loss_decreases_on_a_fixed_batch(real_model):
    """Distilling the real DeiT-Tiny into its keep-0.5 copy on 4 real images: the loss falls."""
    import csv

    transform = train_transform(real_model, augment=False)
    rows = list(csv.DictReader(open(SHARED / "images" / "imagenet_val.csv")))[:4]
    x = torch.stack(
        [transform(Image.open(SHARED / "images" / "imagenet_val" / r["file"]).convert("RGB")) for r in rows]
    )
    student = evit_patch.apply(real_model, layers=[3, 6, 9], keep=0.5).train()
    optimizer = build_optimizer(student, TrainConfig(lr=1e-5, weight_decay=0.0))
    with torch.no_grad():
        target = real_model(x)
    losses = []
    for _ in range(3):
        loss = finetune_loss(student(x), target, None).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.1 and losses[1] < losses[0] and losses[2] < 0.5 * losses[0], losses


def test_optimizer_skips_decay_on_norms_biases_and_tokens():
    model = make_vit(dtype=torch.float32, img_size=32)
    groups = build_optimizer(model, TrainConfig(weight_decay=0.05)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias"} <= no_decay
    assert "blocks.0.attn.qkv.weight" not in no_decay


# -- data --------------------------------------------------------------------------------------


def test_find_images_kinds(tmp_path):
    write_images(tmp_path / "tree")
    items, labelled = find_images(tmp_path / "tree")
    assert labelled and [(p.name, y) for p, y in items] == [
        ("a_0.png", 0), ("a_1.png", 0), ("a_2.png", 0), ("b_0.png", 1), ("b_1.png", 1), ("b_2.png", 1),
    ]  # fmt: skip
    write_images(tmp_path / "flat", flat=True)
    items, labelled = find_images(tmp_path / "flat")
    assert not labelled and len(items) == 6 and {y for _, y in items} == {UNLABELLED}
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"file,label\n{items[0][0]},5\n")
    assert find_images(manifest) == ([(items[0][0], 5)], True)


def test_find_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist: expected an ImageFolder tree, a folder of"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is empty: no sub-folders and no images"):
        find_images(tmp_path / "empty")
    (tmp_path / "tree" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="the class folders hold no images"):
        find_images(tmp_path / "tree")


def test_folder_labels_must_fit_the_head(tmp_path):
    write_images(tmp_path / "tree")
    items, _ = find_images(tmp_path / "tree")
    check_labels(tmp_path / "tree", items, 2)
    with pytest.raises(ValueError, match="2 class folders that are not ImageNet wnids cannot label a model with 1000"):
        check_labels(tmp_path / "tree", items, 1000)
    with pytest.raises(ValueError, match="label 1 is out of range for a model with 1 classes; pass --distill-only"):
        check_labels(tmp_path / "tree", items, 1)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    paths = write_images(tmp_path, flat=True)
    model = make_vit(dtype=torch.float32, img_size=32)
    data = TrainImages([(p, 0) for p in paths], train_transform(model), seed=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = data[2][0]
    assert torch.equal(torch.get_rng_state(), before)  # global RNG untouched
    torch.manual_seed(999)
    assert torch.equal(data[2][0], first) and first.shape == (3, 32, 32)
    data.epoch = 1
    assert not torch.equal(data[2][0], first)


def test_unreadable_image_is_skipped_with_a_warning_and_counted(tmp_path):
    paths = write_images(tmp_path, flat=True)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    items = [(paths[0], 0), (broken, 1), (paths[1], 2)]
    data = TrainImages(items, train_transform(make_vit(dtype=torch.float32, img_size=32), augment=False))
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.jpg"):
        image, label, skipped = data[1]
    assert (label, skipped) == (2, 1) and image.shape == (3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data[0][1:] == (0, 0)
    all_broken = TrainImages([(broken, 0)] * 3, data.transform)
    with pytest.raises(RuntimeError, match="16 consecutive unreadable images from .*broken.jpg: is the data"):
        with pytest.warns(UserWarning):
            all_broken[0]


def test_sampler_ranks_partition_the_single_process_batches():
    single = ResumableBatches(23, 4, seed=7)
    ranks = [ResumableBatches(23, 2, seed=7, rank=r, world_size=2) for r in (0, 1)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 5
    for epoch in (0, 1):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        for whole, a, b in zip(single, *ranks):
            assert sorted(whole) == sorted(a + b)
    single.set_epoch(1)
    full = list(single)
    single.set_epoch(1, start=3)
    assert list(single) == full[3:] and len(single) == 2
    assert len({i for batch in full for i in batch}) == 20  # a permutation, cut to whole steps


def test_sampler_needs_one_optimizer_step_of_images():
    with pytest.raises(ValueError, match=r"5 images are fewer than one optimizer step takes: batch size 2 x 2 proc"):
        ResumableBatches(5, 2, world_size=2, accum=2)


# -- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_roundtrip_and_rotation(tmp_path):
    model = evit_patch.apply(make_vit("test_vit", dtype=torch.float32, img_size=32), keep=0.7)
    torch.manual_seed(5)
    state = {"step": 2, "identity": {"model": "x"}, "rng": [checkpoint.rng_state()]}
    first = checkpoint.save(tmp_path, 2, model, state)
    second = checkpoint.save(tmp_path, 4, model, {**state, "step": 4}, keep_last=1)
    assert checkpoint.complete(tmp_path) == [second] and not first.exists()
    assert checkpoint.latest(tmp_path) == second
    loaded = checkpoint.load_state(second)
    assert loaded["step"] == 4 and torch.equal(loaded["rng"][0]["torch"], state["rng"][0]["torch"])
    reloaded = evit_patch.load_pretrained(second)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    torch.manual_seed(0)
    checkpoint.set_rng_state(loaded["rng"][0])
    assert torch.equal(torch.get_rng_state(), state["rng"][0]["torch"])


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = evit_patch.apply(make_vit("test_vit", dtype=torch.float32, img_size=32), keep=0.7)
    good = checkpoint.save(tmp_path, 1, model, {"step": 1})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, model, {"step": 2})
    assert checkpoint.latest(tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]


def test_resume_refuses_another_run(tmp_path):
    saved = {"model": "deit_tiny_patch16_224", "keep": [0.7, 0.7, 0.7]}
    with pytest.raises(CheckpointError, match=r"belongs to a different run; keep: checkpoint \[0.7, 0.7, 0.7\], this"):
        checkpoint.check_same_run(saved, {**saved, "keep": [0.5, 0.5, 0.5]}, tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        checkpoint.latest(tmp_path)
