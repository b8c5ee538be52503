"""``tools/finetune.py`` end to end: real images, exact resume after a kill, DDP, clear refusals.

Small random-init models at 64 px on generated images unless the test says otherwise; runs that
must be separate processes (a kill, torchrun) are subprocesses with one thread each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SHARED, WEIGHTS, make_vit
from safetensors.torch import load_file
from test_train import write_images

import evit_patch
from evit_patch.commands import finetune
from evit_patch.errors import CheckpointError, InvalidPlanError

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "finetune.py"


def parse(argv):
    parser = argparse.ArgumentParser()
    finetune.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def small_run(data, output, *extra):
    """Flags of a fast run: timm's test ViT (6 blocks of 64 channels) at 64 px (16 tokens), 24 images, no
    workers: what is tested (resume, DDP, refusals) is the loop's, and a smaller model is cheaper to
    create, patch and checkpoint."""
    return [
        "--model", "test_vit", "--img-size", "64", "--data-dir", data, "--output", output,
        "--batch-size", "4", "--workers", "0", "--lr", "1e-3", "--warmup-steps", "2", "--keep-warmup", "4",
        "--keep", "0.5", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root, classes=("x", "y", "z"), per_class=8, size=72, flat=True)
    return root


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def steps(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r]


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def run_tool(argv, *, launcher=(sys.executable,)):
    result = subprocess.run(
        [*launcher, str(TOOL), *map(str, argv)], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_real_images_end_to_end_and_reload(tmp_path):
    """A few steps of the real DeiT-Tiny on real ImageNet images; the output reloads in one call."""
    if not WEIGHTS.is_file():
        pytest.skip(f"real weights not found at {WEIGHTS}")

    def manifest(name, count):
        rows = list(csv.DictReader(open(SHARED / "images" / f"{name}.csv")))[:count]
        path = tmp_path / f"{name}.csv"
        path.write_text(
            "file,label\n" + "".join(f"{SHARED / 'images' / name / r['file']},{r['label']}\n" for r in rows)
        )
        return path

    out = tmp_path / "run"
    argv = [
        "--model", "deit_tiny_patch16_224", "--checkpoint", WEIGHTS, "--data-dir", manifest("imagenet_sample", 8),
        "--val-dir", manifest("imagenet_val", 8), "--output", out, "--batch-size", "4", "--workers", "0",
        "--lr", "1e-5", "--keep-warmup", "1", "--keep", "0.7",
    ]  # fmt: skip
    summary = finetune.run(parse(argv))
    assert summary["finished"] and summary["step"] == 2 and summary["epoch"] == 1
    before, after = summary["evals"]
    assert before["images"] == after["images"] == 8
    assert before["teacher_top1"] == after["teacher_top1"]  # the teacher is frozen
    assert after["keep"] == [0.7, 0.7, 0.7]
    logged = steps(out)
    assert [r["step"] for r in logged] == [1, 2]
    assert logged[0]["keep"] == [1.0, 1.0, 1.0] and logged[1]["keep"] == [0.7, 0.7, 0.7]
    assert all(r["loss"] > 0 and r["ce"] > 0 and r["skipped_images"] == 0 for r in logged)

    model = evit_patch.load_pretrained(out / "final")
    assert evit_patch.get_config(model).keep == (0.7, 0.7, 0.7)
    last = evit_patch.load_pretrained(out / "checkpoints" / "step_00000002")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), last(x))
    original = load_file(str(WEIGHTS))
    changed = weights(out)
    assert changed.keys() == original.keys()
    assert not torch.equal(changed["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"])


def test_resume_after_a_kill_is_bit_exact(images, tmp_path):
    """A run killed mid-epoch and resumed ends with the very weights of an uninterrupted run."""
    flags = ["--epochs", "2", "--checkpoint-every", "2", "--threads", "1"]  # every 2: half the fsynced writes
    finetune.run(parse(small_run(images, tmp_path / "whole", *flags)))  # in process: one interpreter start less

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(TOOL), *map(str, small_run(images, killed, *flags))],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = killed / "log.jsonl"
    while proc.poll() is None and not (log.is_file() and log.read_text().count("\n") >= 4):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "final").exists()
    stopped_at = int(max(p.name for p in (killed / "checkpoints").glob("step_*")).removeprefix("step_"))
    assert 2 <= stopped_at < 12  # 24 images / batch 4 = 6 steps per epoch, 2 epochs

    finetune.run(parse(small_run(images, killed, *flags[:-2], "--resume", killed, "--threads", "1")))
    whole, resumed = weights(tmp_path / "whole"), weights(killed)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert [r["loss"] for r in steps(killed)] == [r["loss"] for r in steps(tmp_path / "whole")]


def test_max_steps_then_resume_with_accumulation_and_clipping(images, tmp_path):
    """Stopping at --max-steps and resuming equals one run, with grad accumulation and clipping."""
    flags = ["--batch-size", "2", "--grad-accum-steps", "2", "--clip-grad", "0.5", "--checkpoint-every", "0"]
    whole = finetune.run(parse(small_run(images, tmp_path / "whole", *flags)))
    first = finetune.run(parse(small_run(images, tmp_path / "part", *flags, "--max-steps", "4")))
    assert (first["step"], first["finished"]) == (4, False)
    assert [p.name for p in (tmp_path / "part" / "checkpoints").iterdir()] == ["step_00000004"]
    second = finetune.run(parse(small_run(images, tmp_path / "part", *flags, "--resume", tmp_path / "part")))
    assert whole["step"] == second["step"] == 6 and second["finished"]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_amp_channels_last_unlabelled_run(images, tmp_path):
    """bf16 autocast and channels-last train; an unlabelled folder trains on distillation alone."""
    summary = finetune.run(parse(small_run(images, tmp_path / "amp", "--amp", "--channels-last", "--max-steps", "2")))
    assert summary["step"] == 2
    logged = steps(tmp_path / "amp")
    assert all(r["ce"] == 0.0 and r["loss"] == r["distill"] for r in logged)
    assert logged[0]["keep"] == [1.0, 1.0, 1.0] and logged[0]["loss"] == 0.0  # keep 1.0 is the original
    assert logged[1]["keep"][0] < 1.0 and logged[1]["loss"] > 0


def test_unreadable_image_is_skipped_and_counted_in_the_log(tmp_path):
    write_images(tmp_path / "data", classes=("p",), per_class=6, size=72, flat=True)
    (tmp_path / "data" / "broken.jpg").write_bytes(b"truncated")
    argv = small_run(tmp_path / "data", tmp_path / "run", "--max-steps", "1")
    argv[argv.index("--batch-size") + 1] = "7"
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.jpg"):
        finetune.run(parse(argv))
    assert [r["skipped_images"] for r in steps(tmp_path / "run")] == [1]


@pytest.fixture(scope="module")
def peaked_weights(tmp_path_factory):
    """A random-init 64 px test ViT with 8x query/key weights: at random init the [CLS] attention
    is nearly uniform, so batch-size-dependent rounding would flip which tokens are kept."""
    from safetensors.torch import save_file

    model = make_vit("test_vit", dtype=torch.float32, img_size=64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in state:
        if k.endswith("attn.qkv.weight"):
            state[k][: 2 * model.embed_dim] *= 8.0
    path = tmp_path_factory.mktemp("weights") / "peaked.safetensors"
    save_file(state, str(path))
    return path


def test_ddp_two_processes_match_one_process(images, peaked_weights, tmp_path):
    """torchrun with 2 gloo processes x batch 2 equals 1 process x batch 4 (same global batch)."""
    common = ["--epochs", "1", "--threads", "1", "--checkpoint", peaked_weights]
    single_argv = small_run(images, tmp_path / "single", *common)
    single_argv[single_argv.index("--lr") + 1] = "1e-4"
    finetune.run(parse(single_argv))
    argv = small_run(images, tmp_path / "ddp", *common)
    argv[argv.index("--batch-size") + 1] = "2"
    argv[argv.index("--lr") + 1] = "1e-4"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    out = run_tool(argv, launcher=launcher)
    assert "2 process(es) on cpu, global batch 4" in out.stdout
    single, ddp = steps(tmp_path / "single"), steps(tmp_path / "ddp")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes the log
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=1e-3)
    start, a, b = load_file(str(peaked_weights)), weights(tmp_path / "single"), weights(tmp_path / "ddp")
    assert a.keys() == b.keys()
    # Float rounding differs with the batch split, and AdamW's normalised steps carry it to the
    # size of a step for near-zero gradients: compare within one step (lr) and the updates as a whole.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)
    update_a = torch.cat([(a[k] - start[k]).flatten() for k in a])
    update_b = torch.cat([(b[k] - start[k]).flatten() for k in a])
    assert (update_b - update_a).norm() < 0.01 * update_a.norm()


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"--keep": "1.5"}, InvalidPlanError, r"keep must be a number in \(0, 1\], got 1.5"),
        ({"--layers": "6"}, InvalidPlanError, r"layer 6 is out of range; the model has 6 blocks"),
        ({"--data-dir": "missing"}, FileNotFoundError, r"missing does not exist: expected an ImageFolder tree"),
        ({"--data-dir": "empty"}, ValueError, r"empty is empty: no sub-folders and no images"),
        ({"--batch-size": "32"}, ValueError, r"24 images are fewer than one optimizer step takes: batch size 32"),
    ],
)
def test_bad_input_is_refused_clearly(images, tmp_path, change, error, message):
    (tmp_path / "empty").mkdir()
    argv = small_run(images, tmp_path / "out", "--max-steps", "1")
    for flag, value in change.items():
        value = tmp_path / value if flag == "--data-dir" else value
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(error, match=message):
        finetune.run(parse(argv))


def test_resume_refuses_another_model_or_plan(images, tmp_path):
    out = tmp_path / "run"
    finetune.run(parse(small_run(images, out, "--max-steps", "1")))
    with pytest.raises(CheckpointError, match=r"already holds a run \(step_00000001\); pass --resume"):
        finetune.run(parse(small_run(images, out, "--max-steps", "2")))
    other = small_run(images, out, "--resume", out)
    other[other.index("--keep") + 1] = "0.7"
    with pytest.raises(CheckpointError, match=r"different run; keep: checkpoint \[0.5, 0.5, 0.5\], this run \[0.7"):
        finetune.run(parse(other))
    other = small_run(images, out, "--resume", out)
    other[other.index("test_vit")] = "test_vit2"
    with pytest.raises(CheckpointError, match=r"model: checkpoint 'test_vit', this run 'test_vit2'"):
        finetune.run(parse(other))
    with pytest.raises(FileNotFoundError, match=r"fresh does not exist: expected the --output directory of an earlier"):
        finetune.run(parse(small_run(images, tmp_path / "fresh", "--resume", tmp_path / "fresh")))
    (tmp_path / "fresh").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        finetune.run(parse(small_run(images, tmp_path / "fresh", "--resume", tmp_path / "fresh")))


def test_merging_model_fine_tunes_and_reloads_with_its_method(images, tmp_path):
    """``--method merge`` trains (a finite, non-zero distillation loss once tokens merge) and the
    deliverable reloads as a merging model."""
    summary = finetune.run(parse(small_run(images, tmp_path / "merge", "--method", "merge", "--max-steps", "6")))
    assert summary["step"] == 6
    logged = steps(tmp_path / "merge")
    assert logged[-1]["keep"][0] == 0.5 and logged[-1]["loss"] > 0
    loaded = evit_patch.load_pretrained(tmp_path / "merge" / "final")
    config = evit_patch.get_config(loaded)
    assert config.method is evit_patch.Method.MERGE and config.keep == (0.5, 0.5, 0.5)
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.randn(2, 3, 64, 64))).all()


def test_defaults_suit_a_short_first_run():
    """A low learning rate and a soft target (docs/finetuning.md: with lr 5e-5 and T=1 a one-epoch
    run moved the model away from the original on held-out images); the CLI and TrainConfig agree."""
    from evit_patch.train.loop import TrainConfig

    args = parse(["--data-dir", "unused"])
    assert (args.lr, args.temperature) == (1e-5, 2.0)
    assert (TrainConfig.lr, TrainConfig.temperature) == (args.lr, args.temperature)
