"""Shared fixtures. Tests run offline: models are random-init or the real weights in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per worker (README runs one worker per core): most of a test's time is
    # single-threaded Python (tracing, fake-tensor shapes), so workers, not threads, fill the cores.
    torch.set_num_threads(1)

SHARED = Path(os.environ.get("EVIT_PATCH_SHARED", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"


def make_vit(name: str = "deit_tiny_patch16_224", *, dtype=torch.float64, seed: int = 0, **kwargs):
    """A random-init timm model in eval mode; float64 so top-k ties cannot flake."""
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs).to(dtype).eval()


def images(batch: int = 2, size: int = 224, *, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="session")
def real_model():
    if not WEIGHTS.is_file():
        pytest.skip(f"real weights not found at {WEIGHTS}")
    from evit_patch.deploy.weights import create_model

    return create_model("deit_tiny_patch16_224", checkpoint=WEIGHTS)


def _decoded(model, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    from timm.data import create_transform, resolve_data_config

    from evit_patch.bench.data import load_images

    transform = create_transform(**resolve_data_config({}, model=model))
    return load_images(SHARED / "images" / f"{name}.csv", transform, progress=False)


@pytest.fixture(scope="session")
def real_val_images(real_model):
    """The 75 real ImageNet validation images and labels: enough for tests that compare a few."""
    return _decoded(real_model, "imagenet_val")


@pytest.fixture(scope="session")
def real_images(real_model, real_val_images, tmp_path_factory):
    """325 real images: the 75 val and every third of the 750 sample images; a third keeps the
    real-weights checks to seconds with their bounds still measured, and only those are decoded."""
    import csv

    from timm.data import create_transform, resolve_data_config

    from evit_patch.bench.data import load_images

    folder = tmp_path_factory.mktemp("sample_thirds")
    rows = list(csv.DictReader(open(SHARED / "images" / "imagenet_sample.csv")))[::3]
    manifest = folder / "imagenet_sample_thirds.csv"
    manifest.write_text(
        "file,label\n" + "".join(f"{SHARED / 'images' / 'imagenet_sample' / r['file']},{r['label']}\n" for r in rows)
    )
    transform = create_transform(**resolve_data_config({}, model=real_model))
    sample = load_images(manifest, transform, cache_dir=folder, progress=False)
    parts = (real_val_images, sample)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), len(real_val_images[0])
