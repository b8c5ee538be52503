"""CLI rough edges (issue 15, item 16): one default --model, every flag has help, --help examples use
evit-patch, visualize stays offline without --pretrained, pt2 export warns about nothing, and
finetune --resume DIR takes the run's flags from its args.json."""

from __future__ import annotations

import importlib
import json
import warnings

import pytest
import timm
import torch
from test_train import write_images

import evit_patch
from evit_patch import cli
from evit_patch.commands.common import DEFAULT_MODEL


def _subparsers():
    parser = cli.build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


def test_every_command_has_the_same_default_model():
    defaults = {name: sub.get_default("model") for name, sub in _subparsers().items()}
    assert defaults == dict.fromkeys(cli.COMMANDS, DEFAULT_MODEL)


def test_every_flag_has_help():
    missing = {
        name: [a.option_strings for a in sub._actions if not a.help and a.dest != "help"]
        for name, sub in _subparsers().items()
    }
    assert missing == dict.fromkeys(cli.COMMANDS, [])


def test_help_examples_use_the_command_not_tools():
    for name in cli.COMMANDS:
        doc = importlib.import_module(f"evit_patch.commands.{name}").__doc__
        assert "python tools/" not in doc, name


def test_visualize_without_weights_stays_offline(tmp_path, capsys, monkeypatch):
    import timm

    calls = []
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k.get("pretrained")) or create(*a, **k))
    (image,) = write_images(tmp_path / "img", classes=("a",), per_class=1, size=80, flat=True)
    argv = ["visualize", "--image", str(image), "--data-dir", str(tmp_path), "--output", str(tmp_path / "v.png")]
    assert cli.main([*argv, "--layers", "1", "--img-size", "64"]) == 0
    assert calls == [False]
    assert f"{DEFAULT_MODEL}: random-init weights" in capsys.readouterr().out


def test_pt2_export_warns_about_nothing(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["export", "--format", "pt2", "--output", str(tmp_path / "m.pt2"), "--batch-size", "2"]) == 0
    assert [str(w.message) for w in caught if "pt2" in str(w.message)] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]


def test_finetune_resume_takes_the_runs_flags(tmp_path):
    write_images(tmp_path / "data", classes=("n01440764", "n01443537"), per_class=4, size=72)
    first = ["finetune", "--model", "test_vit", "--img-size", "64", "--data-dir", tmp_path / "data"]
    first += ["--output", tmp_path / "run"]
    first += ["--batch-size", "4", "--workers", "0", "--keep", "0.5", "--layers", "1", "2", "--max-steps", "1"]
    assert cli.main([str(a) for a in first]) == 0
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    assert saved["keep"] == [0.5] and "argv" not in saved
    assert cli.main(["finetune", "--resume", str(tmp_path / "run"), "--max-steps", "2"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["identity"]["keep"] == [0.5, 0.5] and summary["identity"]["layers"] == [1, 2]
    assert summary["step"] == 2


def test_finetune_at_a_budget(tmp_path):
    """--flops as `plan` takes it: with --method merge the planner picks the layers and the keep rate."""
    write_images(tmp_path / "data", classes=("n01440764", "n01443537"), per_class=4, size=72)
    argv = ["finetune", "--img-size", "64", "--data-dir", tmp_path / "data", "--output", tmp_path / "run"]
    argv += ["--batch-size", "4", "--workers", "0", "--flops", "0.8", "--method", "merge", "--max-steps", "1"]
    assert cli.main([str(a) for a in argv]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    teacher = timm.create_model(DEFAULT_MODEL, img_size=64)  # the plan depends on the architecture alone
    config = evit_patch.plan(teacher, flops=0.8, method="merge")
    assert summary["identity"]["layers"] == list(config.layers) == list(range(3, 12))
    assert summary["identity"]["keep"] == list(config.keep)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["flops"] == 0.8


def test_finetune_without_data_dir_says_so(capsys):
    assert cli.main(["finetune", "--output", "x"]) == 2
    assert (
        capsys.readouterr().err == "evit-patch finetune: error: give --data-dir (or --resume a run started with one)\n"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default")
def test_benchmark_device_default_is_usable():
    assert _subparsers()["benchmark"].get_default("device") == "cpu"
