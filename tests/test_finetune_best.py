"""finetune --val-dir keeps the model with the lowest validation KL as <output>/best, the untouched
patched model included, so a run that makes things worse still leaves its best model (issue 15, item 18)."""

from __future__ import annotations

import json

import torch
from conftest import images
from test_train import write_images

import evit_patch
from evit_patch import cli
from evit_patch.deploy.weights import create_model


def test_a_run_that_makes_kl_worse_keeps_the_untouched_model(tmp_path):
    write_images(tmp_path / "train", classes=("n01440764", "n01443537"), per_class=4, size=72)
    write_images(tmp_path / "val", classes=("n01440764", "n01443537"), per_class=2, size=72)
    argv = [
        "finetune",
        "--model",
        "test_vit",
        "--img-size",
        "64",
        "--data-dir",
        tmp_path / "train",
        "--val-dir",
        tmp_path / "val",
    ]
    argv += ["--output", tmp_path / "run", "--batch-size", "4", "--workers", "0", "--keep", "0.5", "--epochs", "2"]
    argv += ["--lr", "0.5", "--warmup-steps", "0", "--keep-warmup", "0", "--no-aug"]  # a learning rate that wrecks it
    assert cli.main([str(a) for a in argv]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    kls = [e["mean_kl"] for e in summary["evals"]]
    assert len(kls) == 3 and min(kls) == kls[0] < kls[-1]
    assert summary["best"]["step"] == 0 and summary["best"]["mean_kl"] == kls[0]
    best = evit_patch.load_pretrained(tmp_path / "run" / "best")
    torch.manual_seed(42)  # finetune's seed: the same random-init teacher
    teacher = create_model("test_vit", img_size=64)  # timm's 6-block test ViT: default layers 2, 3, 4
    x = images(2, size=64, dtype=torch.float32)
    with torch.no_grad():
        expected = evit_patch.apply(teacher, layers=[2, 3, 4], keep=0.5)(x)
        torch.testing.assert_close(best(x), expected, rtol=0, atol=0)
