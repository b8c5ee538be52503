"""Draw which patches EViT keeps: one column per reorganizing block, with its [CLS] attention.

Rendering only; which patch is where comes from :mod:`evit_patch.analysis.tracking`. Pillow alone, so
the figure needs no plotting library.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from .tracking import PatchStatus, TokenTrace, track_tokens

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PAD, CAPTION = 6, 18
DIM = 0.3
"""Brightness left to a patch that is no longer a token of its own."""
TINTS = {
    PatchStatus.FUSED_HERE: ((255, 140, 0), "fused at this block"),
    PatchStatus.FUSED_EARLIER: ((40, 150, 255), "earlier fused token"),
    PatchStatus.DROPPED: ((0, 0, 0), "dropped (no fusion)"),
}
TINT_COLOURS = {tint for tint, _ in TINTS.values()}
INFERNO = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))


def visualize(
    model: nn.Module,
    x: Tensor,
    *,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    panel: int = 160,
) -> Image.Image:
    """Figure of the patches a patched model keeps, for each image of a batch.

    Two rows per image: the input and then, per reorganizing block, the patches still kept as
    tokens of their own (dropped ones dimmed, those merged into a fused token tinted); below
    each, the block's head-averaged [CLS] attention per patch (a token standing for several
    patches spreads its score over them), scaled to the panel's maximum.

    Args:
        model: a model returned by :func:`evit_patch.apply`; any input size its patch embed accepts.
        x: ``(B, 3, H, W)`` images, normalised as the model expects.
        class_names: label of each class; the input panel then shows the patched model's top-1.
        mean: per-channel mean ``x`` was normalised with, to show the images (default: the
            model's ``pretrained_cfg``, else ImageNet's).
        std: per-channel standard deviation, likewise.
        panel: pixels on the longer image side, per panel.
    """
    trace = track_tokens(model, x)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(mean or cfg.get("mean", IMAGENET_MEAN), dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(std or cfg.get("std", IMAGENET_STD), dtype=torch.float32).view(-1, 1, 1)
    pictures = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    height, width = x.shape[-2:]
    size = (panel, round(panel * height / width)) if width >= height else (round(panel * width / height), panel)
    pictures = F.interpolate(pictures, size=size[::-1], mode="bilinear", antialias=True, align_corners=False)
    captions = ["input"] * len(x)
    if class_names is not None:
        prob, top = trace.logits.float().softmax(-1).max(-1)
        captions = [f"{class_names[int(c)]} ({p:.0%})" for c, p in zip(top, prob)]
    return render(trace, pictures, captions)


def render(trace: TokenTrace, pictures: Tensor, captions: Sequence[str]) -> Image.Image:
    """Lay out the figure for ``pictures`` ``(B, 3, h, w)`` in ``[0, 1]``, already at panel size."""
    batch, _, h, w = pictures.shape
    columns, rows = 1 + len(trace.stages), 2 * batch
    sheet = Image.new("RGB", (PAD + columns * (w + PAD), PAD + rows * (CAPTION + h + PAD)), "white")
    draw, font = ImageDraw.Draw(sheet), _font(12)

    def put(row: int, column: int, image: Tensor | None, caption: str) -> tuple[int, int]:
        left, top = PAD + column * (w + PAD), PAD + row * (CAPTION + h + PAD)
        draw.text((left, top + 2), _fit(draw, caption, font, w), fill="black", font=font)
        if image is not None:
            sheet.paste(_to_pil(image), (left, top + CAPTION))
        return left, top + CAPTION

    for b in range(batch):
        picture = pictures[b]
        put(2 * b, 0, picture, captions[b])
        statuses = [stage.patch_status()[b].view(trace.grid).cpu() for stage in trace.stages]
        shown = {int(code) for status in statuses for code in status.unique()}
        _legend(draw, font, put(2 * b + 1, 0, None, "legend"), w, shown)
        for i, (stage, status) in enumerate(zip(trace.stages, statuses)):
            kept = int((status == PatchStatus.KEPT).sum())
            fused = f", {int((status == PatchStatus.FUSED_HERE).sum())} fused" if stage.fused else ""
            put(2 * b, i + 1, _shade(picture, status), f"block {stage.layer}: {kept} kept{fused}")
            heat = trace.patch_attention(i)[b].view(trace.grid).float().cpu()
            put(2 * b + 1, i + 1, _heat(picture, heat), f"[CLS] attention, block {stage.layer}")
    return sheet


def _upsample(grid: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(grid[None, None].float(), size=size, mode="nearest")[0, 0]


def _shade(picture: Tensor, status: Tensor) -> Tensor:
    """Kept patches as they are; the others dimmed, tinted by where they went."""
    status = _upsample(status, picture.shape[-2:]).long()
    out = picture.clone()
    for code, (tint, _) in TINTS.items():
        where = status == code
        colour = torch.tensor(tint, dtype=picture.dtype).view(3, 1, 1) / 255
        out[:, where] = (DIM * picture + (1 - DIM) * 0.6 * colour)[:, where]
    return out


def _heat(picture: Tensor, heat: Tensor) -> Tensor:
    """Attention per patch in the inferno colour map over a grey copy of the picture."""
    level = _upsample(heat / heat.max().clamp(min=1e-12), picture.shape[-2:])
    anchors = torch.tensor(INFERNO, dtype=picture.dtype) / 255
    position = level * (len(anchors) - 1)
    low = position.floor().long().clamp(max=len(anchors) - 2)
    frac = (position - low).unsqueeze(0)
    colour = anchors[low].permute(2, 0, 1) * (1 - frac) + anchors[low + 1].permute(2, 0, 1) * frac
    grey = picture.mean(0, keepdim=True)
    return 0.25 * grey + 0.75 * colour


def _legend(draw: ImageDraw.ImageDraw, font, origin: tuple[int, int], width: int, shown: set[int]) -> None:
    """Swatches for the patch states that appear in the row, and the heat map's top colour."""
    left, top = origin
    entries = [((255, 255, 255), "kept as its own token")] + [TINTS[c] for c in TINTS if c in shown]
    for n, (tint, label) in enumerate([*entries, (INFERNO[-1], "most [CLS] attention")]):
        y = top + 4 + 18 * n
        shade = tuple(round(DIM * 128 + (1 - DIM) * 0.6 * c) for c in tint) if tint in TINT_COLOURS else tint
        draw.rectangle((left, y, left + 12, y + 12), fill=shade, outline="black")
        draw.text((left + 18, y), _fit(draw, label, font, width - 18), fill="black", font=font)


def _to_pil(image: Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text
