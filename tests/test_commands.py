"""The benchmark and evaluate commands run end to end; nothing here asserts a time."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
from conftest import SHARED, WEIGHTS

import evit_patch
from evit_patch.commands import benchmark, evaluate


def _args(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_benchmark_reports_flops_consistently(tmp_path):
    out = tmp_path / "bench.json"
    args = _args(
        benchmark,
        [
            "--model",
            "test_vit",  # timm's 6-block, 64-channel test ViT: the command's logic, at a fraction of the cost
            "--batch-size",
            "1",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--keep",
            "0.5",
            "--json",
            str(out),
        ],
    )
    results = benchmark.run(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    rows = results["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["gmacs_counted"] == pytest.approx([r["gmacs_original"], r["gmacs_patched"]], rel=1e-12)
        assert r["ideal_speedup"] == pytest.approx(r["gmacs_original"] / r["gmacs_patched"])
        assert r["speedup"] == pytest.approx(r["img_s_patched"] / r["img_s_original"])


def test_benchmark_overhead_mode_keeps_flops_nearly_equal():
    args = _args(
        benchmark,
        ["--model", "test_vit", "--batch-size", "1", "--rounds", "1", "--warmup", "0", "--overhead"],
    )
    row = benchmark.run(args)["rows"][0]
    # Forced reorganization at keep 1.0 only adds the [CLS] rows: 3 layers x 101 tokens (test_vit's 160 px:
    # 100 patches and [CLS]) x 64 channels MACs.
    assert row["gmacs_counted"][1] - row["gmacs_counted"][0] == pytest.approx(3 * 101 * 64 / 1e9, rel=1e-9)


def test_benchmark_sweep_writes_csv(tmp_path):
    args = _args(
        benchmark,
        [
            "--model",
            "test_vit",
            "--sweep",
            "--sweep-keep",
            "0.9",
            "0.5",
            "--sweep-layers",
            "2,3,4",
            "1",
            "--batch-size",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--json",
            str(tmp_path / "sweep.json"),
        ],
    )
    rows = benchmark.run(args)["sweep"]
    assert [(r["layers"], r["keep"]) for r in rows] == [("2,3,4", 0.9), ("2,3,4", 0.5), ("1", 0.9), ("1", 0.5)]
    assert rows[1]["gmacs_patched"] < rows[0]["gmacs_patched"] < rows[0]["gmacs_original"]
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 5


@pytest.mark.slow
def test_evaluate_on_real_val_images(tmp_path):
    """The first 32 val images (keep 0.7 agrees on 27 of them, 84.4 %, measured with this code)."""
    if not WEIGHTS.is_file():
        pytest.skip("real weights missing")
    rows = list(csv.DictReader(open(SHARED / "images" / "imagenet_val.csv")))[:32]
    manifest = tmp_path / "val32.csv"
    manifest.write_text(
        "file,label\n" + "".join(f"{SHARED / 'images' / 'imagenet_val' / r['file']},{r['label']}\n" for r in rows)
    )
    args = _args(
        evaluate,
        [
            "--checkpoint",
            str(WEIGHTS),
            "--data",
            str(manifest),
            "--keep",
            "1.0",
            "0.7",
            "--sweep",
            "--json",
            str(tmp_path / "e.json"),
        ],
    )
    full, pruned = evaluate.run(args)
    assert full["images"] == 32 and full["agreement"] == 1.0 and full["mean_kl"] == 0.0
    assert full["top1_patched"] == full["top1_original"]
    assert 0.78 <= pruned["agreement"] < 1.0 and pruned["gmacs"] < full["gmacs"]


def test_evaluate_refuses_missing_data(tmp_path):
    args = _args(evaluate, ["--data", str(tmp_path / "nope.csv")])
    with pytest.raises(FileNotFoundError, match="nope.csv does not exist: expected a manifest .csv or an ImageFolder"):
        evaluate.run(args)


def test_plan_command_meets_the_budget(tmp_path):
    from evit_patch.commands import plan

    args = _args(plan, ["--model", "deit_tiny_patch16_224", "--speedup", "1.5", "--json", str(tmp_path / "p.json")])
    result = plan.run(args)
    assert result == json.loads((tmp_path / "p.json").read_text())
    assert result["analytic"]["layers"] == [3, 6, 9]
    original = evit_patch.explain(evit_patch.apply(plan.load_model(args), keep=1.0)).macs_original / 1e9
    assert original / 1.5 - 0.01 <= result["gmacs"] <= original / 1.5
