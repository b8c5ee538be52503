"""Wrapped models (DataParallel, DDP, torch.compile, a container) are refused with what to pass instead
(issue 15, item 15)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import images, make_vit
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import evit_patch
from evit_patch import UnsupportedModelError


def _small():
    return make_vit(img_size=64, depth=4, num_classes=10)


def test_data_parallel_is_refused_with_module():
    with pytest.raises(
        UnsupportedModelError,
        match=r"^DataParallel is not itself a vision transformer: it wraps one; pass model.module to evit_patch, "
        r"then wrap the patched copy in DataParallel$",
    ):
        evit_patch.apply(nn.DataParallel(_small()))


def test_distributed_data_parallel_is_refused_with_module(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(UnsupportedModelError, match=r"^DistributedDataParallel is not itself .* pass model.module"):
            evit_patch.apply(DistributedDataParallel(_small()))
    finally:
        dist.destroy_process_group()


def test_compiled_model_is_refused_with_orig_mod():
    with pytest.raises(
        UnsupportedModelError,
        match=r"^OptimizedModule \(deit_tiny_patch16_224\) is not itself a vision transformer: it is torch.compile's "
        r"wrapper; pass model._orig_mod to evit_patch, then torch.compile the patched copy$",
    ):
        evit_patch.apply(torch.compile(_small()))


def test_container_names_where_the_model_is():
    model = _small()
    with pytest.raises(
        UnsupportedModelError,
        match=r"^Sequential is not itself a vision transformer: it holds VisionTransformer \(deit_tiny_patch16_224\) "
        r"at '0'; pass model.get_submodule\('0'\) to evit_patch and put the patched copy in its place",
    ):
        evit_patch.explain(nn.Sequential(model, nn.Softmax(-1)), config=evit_patch.EViTConfig((1,), (0.7,)))
    wrapped = nn.Sequential(model, nn.Softmax(-1))
    wrapped.set_submodule("0", evit_patch.apply(wrapped.get_submodule("0"), layers=[1], keep=0.5))
    x = images(2, size=64)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), evit_patch.apply(model, layers=[1], keep=0.5)(x).softmax(-1))


def test_plain_unknown_module_keeps_the_generic_message():
    with pytest.raises(
        UnsupportedModelError, match=r"^torch\.nn\.modules\.linear\.Linear is not a vision transformer evit_patch knows"
    ):
        evit_patch.apply(nn.Linear(2, 2))
