"""Every user error of the CLI is one line, ``evit-patch CMD: error: ...``, and exit code 2 (issue 15, items 5, 11)."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from test_train import write_images

import evit_patch
from evit_patch import cli

TINY = ["--model", "test_vit"]  # timm's 6-block, 64-channel test ViT: default layers 2, 3, 4
RUN = ["--img-size", "64", "--workers", "0", "--max-steps", "1", "--keep", "0.5"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    write_images(root / "flat", classes=("x",), per_class=4, size=72, flat=True)
    write_images(root / "named", classes=("cats", "dogs"), per_class=4, size=72)
    write_images(root / "wnids", classes=("n01440764", "n01443537"), per_class=4, size=72)
    (root / "notes.safetensors").write_text("not weights")
    (root / "notes.pth").write_text("not weights")
    (root / "notes.png").write_text("not an image")
    (root / "exists.onnx").write_bytes(b"x")
    torch.manual_seed(0)
    save_file(timm.create_model("deit_tiny_patch16_224", img_size=64).state_dict(), str(root / "tiny64.safetensors"))
    saved = root / "saved"
    evit_patch.save_pretrained(evit_patch.apply(timm.create_model("test_vit", img_size=64), layers=[2, 3, 4]), saved)
    argv = [*TINY, *RUN, "--data-dir", root / "wnids", "--output", root / "run", "--batch-size", "4"]
    assert cli.main(["finetune", *map(str, argv)]) == 0
    return root


CASES = [
    ("explain", ["--model", "no_such_model"], r"timm has no model named 'no_such_model'; see timm.list_models\(\)"),
    (
        "explain",
        ["--model", "vit_small_patch16_224", "--checkpoint", "{root}/tiny64.safetensors"],
        r"{root}/tiny64.safetensors: weights do not fit timm model 'vit_small_patch16_224': \d+ of another shape "
        r"\(e.g. .*\); is it a checkpoint of another architecture\?",
    ),
    (
        "explain",
        ["--checkpoint", "{root}/notes.safetensors"],
        r"{root}/notes.safetensors: not a readable safetensors file",
    ),
    ("explain", ["--checkpoint", "{root}/notes.pth"], r"{root}/notes.pth: not a weights file \(expected .safetensors"),
    ("explain", ["--checkpoint", "{root}/missing.pth"], r"checkpoint {root}/missing.pth does not exist"),
    ("explain", ["--img-size", "0"], r"argument --img-size: expected a positive integer, got '0'"),
    ("plan", ["--flops", "0.7", "--img-size", "0"], r"argument --img-size: expected a positive integer, got '0'"),
    ("benchmark", ["--batch-size", "0"], r"argument --batch-size: expected a positive integer, got '0'"),
    ("benchmark", ["--rounds", "0"], r"argument --rounds: expected a positive integer, got '0'"),
    ("benchmark", ["--warmup", "-1"], r"argument --warmup: expected an integer of at least 0, got '-1'"),
    (
        "export",
        ["--output", "{root}/x.onnx", "--batch-size", "0"],
        r"argument --batch-size: expected a positive integer",
    ),
    ("finetune", ["--data-dir", "{root}/wnids", "--batch-size", "0"], r"argument --batch-size: expected a positive"),
    ("evaluate", ["--data", "{root}/flat", "--batch-size", "0"], r"argument --batch-size: expected a positive integer"),
    (
        "explain",
        ["--load", "{root}/saved", "--keep", "0.5"],
        r"--load {root}/saved brings its own architecture, weights and plan; --keep would be ignored: drop them, "
        r"or use --model without --load",
    ),
    (
        "export",
        ["--load", "{root}/saved", "--model", "vit_small_patch16_224", "--layers", "1", "--output", "{root}/o.onnx"],
        r"--load {root}/saved brings its own .*; --model, --layers would be ignored",
    ),
    (
        "evaluate",
        [*TINY, "--data", "{root}/flat"],
        r"{root}/flat: expected an ImageFolder tree \(one sub-folder per class\), found no sub-folders",
    ),
    (
        "finetune",
        [*TINY, *RUN, "--data-dir", "{root}/named", "--output", "{root}/o1", "--batch-size", "4"],
        r"{root}/named: 2 class folders that are not ImageNet wnids cannot label a model with 1000 classes; "
        r"pass --distill-only to train without labels",
    ),
    (
        "finetune",
        [*TINY, *RUN, "--data-dir", "{root}/wnids", "--output", "{root}/o2", "--batch-size", "64"],
        r"8 images are fewer than one optimizer step takes: batch size 64",
    ),
    (
        "finetune",
        [*TINY, *RUN, "--data-dir", "{root}/wnids", "--resume", "{root}/run", "--batch-size", "4", "--keep", "0.7"],
        r"--resume .*run.* belongs to a different run; keep: checkpoint \[0.5, 0.5, 0.5\], this run \[0.7, 0.7, 0.7\]",
    ),
    (
        "export",
        [*TINY, "--output", "{root}/exists.onnx"],
        r"--output {root}/exists.onnx exists \(a file\); pass --overwrite to replace it, or choose another path",
    ),
    (
        "export",
        ["--load", "{root}/saved", "--format", "safetensors", "--output", "{root}/saved"],
        r"--output {root}/saved exists \(a non-empty folder\); pass --overwrite",
    ),
    # issue 23, item 10: a directory as --checkpoint, --model given at its default beside --load, --resume of nothing
    (
        "explain",
        ["--checkpoint", "{root}"],
        r"checkpoint {root} is a directory; expected a .safetensors or .pth weights file \(a folder written by "
        r"save_pretrained loads with evit_patch.load_pretrained, or the CLI's --load\)",
    ),
    ("explain", ["--load", "{root}/saved", *TINY], r"--load {root}/saved brings its own .*; --model would be ignored"),
    (
        "export",
        ["--load", "{root}/saved", "--output", "{root}/o.pt2", "--format", "pt2", "--flops", "0.5"],
        r"--load {root}/saved brings its own .*; --flops would be ignored",
    ),
    (
        "finetune",
        ["--resume", "{root}/nope"],
        r"--resume {root}/nope does not exist: expected the --output directory of an earlier finetune run",
    ),
    # item 12: a budget instead of --keep, never both
    ("explain", ["--keep", "0.5", "--flops", "0.5"], r"argument --flops: not allowed with argument --keep"),
    ("explain", ["--speedup", "0.5"], r"speedup budget must be at least 1 at the model's own input size, got 0.5"),
    ("benchmark", ["--flops", "0.5", "--sweep"], r"--sweep sets its own keep rates; drop it, or drop --flops/--speed"),
    (
        "evaluate",
        ["--flops", "0.5", "--sweep", "--data", "{root}/wnids"],
        r"--sweep evaluates each --keep value; with --flops/--speedup there is one plan: drop --sweep",
    ),
    # item 9: no image left to check the calibrated plan on
    (
        "plan",
        ["--model", "test_vit", "--flops", "0.8", "--data", "{root}/wnids", "--calibration-images", "8"],
        r"--data holds 8 images and --calibration-images is 8: no image would be left to check the plans on; give "
        r"more images, or fewer calibration images \(e.g. --calibration-images 4\)",
    ),
    (
        "visualize",
        [*TINY, "--image", "{root}/notes.png", "--output", "{root}/v.png"],
        r"--image {root}/notes.png: not an image PIL can read \(",
    ),
]
if not torch.cuda.is_available():
    CASES += [
        ("benchmark", ["--device", "cuda"], r"argument --device: 'cuda': torch.cuda.is_available\(\) is False"),
        ("finetune", ["--data-dir", "x", "--device", "cuda"], r"argument --device: 'cuda': torch.cuda.is_available"),
    ]


@pytest.mark.parametrize(("command", "argv", "message"), CASES, ids=[f"{c}-{i}" for i, (c, *_) in enumerate(CASES)])
def test_user_errors_are_one_line_and_exit_2(files, capsys, command, argv, message):
    argv = [str(a).format(root=files) for a in argv]
    try:
        code = cli.main([command, *argv])
    except SystemExit as exc:  # argparse reports bad flag values itself, in the same format
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    pattern = message.format(root=re.escape(str(files)))
    assert re.fullmatch(rf"evit-patch {command}: error: {pattern}.*", last), last
    assert "Traceback" not in err
