"""The ``evit-patch`` CLI: subcommands wrap evit_patch.commands, ``python -m evit_patch`` works, errors are one line."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import evit_patch
from evit_patch import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "test_vit", "--layers", "1", "3", "--keep", "0.5"]  # timm's 6-block, 64-channel test ViT


def test_console_script_is_installed_for_cli_main():
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="evit-patch")
    assert entry.value == "evit_patch.cli:main" and entry.load() is cli.main


def test_python_m_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "evit_patch", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: evit-patch [-h] [--version] COMMAND ...")
    text = " ".join(result.stdout.split())  # argparse wraps help to the terminal's width
    for name in cli.COMMANDS:
        summary = " ".join(cli._summary(importlib.import_module(f"evit_patch.commands.{name}")).split())
        assert f" {name} {summary}" in text, name
    assert "export" in cli.COMMANDS and "visualize" in cli.COMMANDS


def test_command_help_is_the_module_docstring(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: evit-patch export" in out and "--format {onnx,pt2,safetensors}" in out
    assert "evit-patch export --load ./deit-tiny-evit --format pt2" in out


def test_explain_prints_the_plan(capsys, tmp_path):
    argv = ["explain", "--model", "deit_tiny_patch16_224", "--layers", "3", "6", "9", "--keep", "0.7"]
    assert cli.main([*argv, "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    expected = evit_patch.explain(evit_patch.apply(timm.create_model("deit_tiny_patch16_224"), [3, 6, 9], 0.7))
    assert out == f"{expected}\n"
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["gmacs_patched"] == expected.macs_patched / 1e9
    assert [b["tokens_in"] for b in saved["blocks"]][3:11:3] == [197, 140, 100]
    assert out.splitlines()[0] == (
        "EViT plan for VisionTransformer (deit_tiny_patch16_224) "
        "(family=timm.VisionTransformer, method=evit, fuse=True, score=cls, proportional attention=off)"
    )
    assert "      1.254      0.821   (0.655x MACs, ideal speedup 1.53x)" in out


def test_a_budget_plans_for_every_command_that_patches(tmp_path, capsys):
    """--flops/--speedup, as `plan` takes them, for explain, export, benchmark and evaluate (finetune:
    test_finetune_at_a_budget); with --method merge the planner picks the layers too."""
    assert cli.main(["explain", "--model", "test_vit", "--flops", "0.7", "--method", "merge"]) == 0
    out = capsys.readouterr().out
    assert "    1     -       101        101" in out and "    2  0.66       101         67" in out
    assert "    5  0.66        31         21" in out and "(0.699x MACs" in out
    output = tmp_path / "saved"
    argv = ["--model", "test_vit", "--speedup", "1.25", "--format", "safetensors", "--output", str(output)]
    assert cli.main(["export", *argv]) == 0
    assert evit_patch.get_config(evit_patch.load_pretrained(output)) == evit_patch.plan(
        timm.create_model("test_vit"), speedup=1.25
    )
    argv = ["--model", "test_vit", "--flops", "0.7", "--batch-size", "1", "--rounds", "1", "--warmup", "0"]
    result = cli.main(["benchmark", *argv, "--json", str(tmp_path / "b.json")])
    assert result == 0 and "flops 0.7: keep" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["flops"] == 0.7


def test_errors_are_one_line_with_exit_code_2(capsys):
    assert cli.main(["explain", "--model", "deit_tiny_patch16_224", "--layers", "12"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "evit-patch explain: error: VisionTransformer (deit_tiny_patch16_224): layer 12 is out of range; "
        "the model has 12 blocks (valid indices 0..11)\n"
    )


@pytest.mark.parametrize("fmt", ["safetensors", "pt2"])  # the ONNX writer: test_onnx.py, test_export.py
def test_export_writes_and_verifies(fmt, tmp_path, capsys):
    model = TINY
    output = tmp_path / {"safetensors": "saved", "pt2": "m.pt2"}[fmt]
    assert cli.main(["export", *model, "--format", fmt, "--output", str(output), "--batch-size", "3", "--verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote {output} ({fmt}, dynamic batch)"
    assert [line.split(" = ")[0] for line in lines[1:]] == [f"verify batch {b}: max |{fmt} - eager|" for b in (1, 3)]
    assert all(float(line.split(" = ")[1]) <= 1e-4 for line in lines[1:])
    assert output.exists()


def test_export_of_a_saved_model_and_a_failed_verification(tmp_path, capsys):
    saved = tmp_path / "saved"
    model = evit_patch.apply(timm.create_model("test_vit"), layers=[2], keep=0.6)
    evit_patch.save_pretrained(model, saved)
    args = ["export", "--load", str(saved), "--format", "safetensors", "--output", str(tmp_path / "copy"), "--verify"]
    assert cli.main([*args, "--tolerance", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"evit-patch export: error: export verification failed: {tmp_path / 'copy'} differs")
    assert err.endswith("(tolerance -1.0); removed it\n")
    assert not (tmp_path / "copy").exists()  # an unverified model is not left to be deployed
    assert cli.main(args) == 0
    assert evit_patch.get_config(evit_patch.load_pretrained(tmp_path / "copy")) == evit_patch.get_config(model)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(evit_patch.load_pretrained(tmp_path / "copy")(x), model.eval()(x))


def test_models_from_torchvision_and_a_transformers_folder(tmp_path, capsys):
    """--model torchvision:NAME and transformers:DIR reach the same plan as timm models do."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=64, patch_size=16, num_hidden_layers=4, num_attention_heads=4, hidden_size=64)
    config.intermediate_size, config.architectures = 128, ["ViTForImageClassification"]
    ViTForImageClassification(config).save_pretrained(tmp_path / "hf")
    assert cli.main(["explain", "--model", f"transformers:{tmp_path / 'hf'}", "--layers", "1", "--keep", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "EViT plan for ViTForImageClassification" in out and "    1  0.50        17         10" in out
    assert cli.main(["explain", "--model", "torchvision:vit_b_32", "--layers", "3", "6", "9", "--keep", "0.7"]) == 0
    assert "EViT plan for VisionTransformer" in capsys.readouterr().out
    assert cli.main(["explain", "--model", "torchvision:vit_nope"]) == 2
    assert capsys.readouterr().err == (
        "evit-patch explain: error: torchvision has no model named 'vit_nope'; see torchvision.models.list_models()\n"
    )
