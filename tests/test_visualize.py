"""The figure shows the tracked patches: kept ones untouched, the others shaded; and the CLI writes it."""

from __future__ import annotations

import numpy as np
import torch
from conftest import images, make_vit
from PIL import Image

import evit_patch
from evit_patch import cli
from evit_patch.analysis.tracking import PatchStatus, track_tokens
from evit_patch.analysis.visualize import CAPTION, PAD


def _panel(sheet: Image.Image, row: int, column: int, w: int, h: int) -> torch.Tensor:
    left, top = PAD + column * (w + PAD), PAD + row * (CAPTION + h + PAD) + CAPTION
    return torch.from_numpy(np.asarray(sheet.crop((left, top, left + w, top + h))).copy())


def test_kept_patches_are_shown_as_they_are_and_the_rest_shaded():
    fast = evit_patch.apply(make_vit(dtype=torch.float32), layers=[3, 6, 9], keep=0.7)
    x = images(2, dtype=torch.float32)
    sheet = evit_patch.visualize(fast, x, panel=224)
    assert sheet.size == (PAD + 4 * (224 + PAD), PAD + 4 * (CAPTION + 224 + PAD))
    trace = track_tokens(fast, x)
    for b in range(2):
        picture = _panel(sheet, 2 * b, 0, 224, 224)
        for i, stage in enumerate(trace.stages):
            shown = _panel(sheet, 2 * b, i + 1, 224, 224)
            cells = lambda t: t.view(14, 16, 14, 16, 3).permute(0, 2, 1, 3, 4).reshape(196, -1)  # noqa: E731
            same = (cells(shown) == cells(picture)).all(-1)
            status = stage.patch_status()[b]
            assert torch.equal(same, status == PatchStatus.KEPT)
            # the patches fused at this block share one tint: orange dominates blue there
            fused = cells(shown)[status == PatchStatus.FUSED_HERE].view(-1, 3).float().mean(0)
            assert fused[0] > fused[2] + 40


def test_any_image_size_sets_the_panel_shape():
    model = make_vit("deit_tiny_patch16_224", dtype=torch.float32, dynamic_img_size=True)
    fast = evit_patch.apply(model, layers=[5], keep=0.5)
    sheet = evit_patch.visualize(fast, images(3, dtype=torch.float32)[:, :, :160], panel=112)
    assert sheet.size == (PAD + 2 * (112 + PAD), PAD + 6 * (CAPTION + 80 + PAD))


def test_cli_writes_the_figure_for_a_batch_of_images(tmp_path, capsys):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "random.safetensors"
    save_file(make_vit(dtype=torch.float32).state_dict(), str(checkpoint))
    paths = []
    for n, size in enumerate([(300, 200), (256, 256)]):
        noise = torch.randint(
            0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(n)
        )
        paths.append(tmp_path / f"{n}.jpg")
        Image.fromarray(noise.numpy()).save(paths[-1])
    out = tmp_path / "figs" / "kept.png"
    common = ["visualize", "--checkpoint", str(checkpoint), "--data-dir", str(tmp_path), "--panel", "64"]
    argv = [*common, "--image", *map(str, paths), "--layers", "2", "5", "--keep", "0.5", "--output", str(out)]
    assert cli.main(argv) == 0
    assert Image.open(out).size == (PAD + 3 * (64 + PAD), PAD + 4 * (CAPTION + 64 + PAD))
    assert sorted(p.name for p in out.parent.iterdir()) == ["kept.png"]
    assert f"wrote {out}" in capsys.readouterr().out
    assert cli.main([*common, "--image", str(tmp_path / "missing.jpg")]) == 2
    assert capsys.readouterr().err == f"evit-patch visualize: error: image not found: {tmp_path / 'missing.jpg'}\n"
