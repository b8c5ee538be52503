"""export_program of transformers and torchvision models: the default example has the model's own
size, and transformers' export-time attention mask is not taken for a caller's (issue 15, item 13)."""

from __future__ import annotations

import pytest
import torch
from cases import small_hf as _small
from cases import small_torchvision
from conftest import images

import evit_patch
from evit_patch.deploy.export import example_input


def small_hf(dtype):
    return _small(dtype=dtype)


@pytest.mark.parametrize("make", [small_hf, small_torchvision], ids=["transformers", "torchvision"])
def test_default_example_has_the_models_size(make):
    assert example_input(make(torch.float32), 3).shape == (3, 3, 64, 64)


@pytest.mark.parametrize("make", [small_hf, small_torchvision], ids=["transformers", "torchvision"])
def test_export_program_without_an_example_matches_eager(make):
    fast = evit_patch.apply(make(torch.float32), layers=[1, 2], keep=0.5)
    program = evit_patch.export_program(fast)
    x = images(3, size=64, dtype=torch.float32)
    with torch.no_grad():
        got, want = program.module()(x), fast(x)
    if hasattr(want, "logits"):
        got, want = got.logits, want.logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_callers_mask_is_still_refused_in_eager():
    fast = evit_patch.apply(small_hf(torch.float32), layers=[1], keep=0.5)
    evit_patch.export_program(fast)  # the export-time patch is undone afterwards
    mask = torch.ones(1, 65)
    mask[0, 5] = 0
    with pytest.raises(evit_patch.UnsupportedInputError, match=r"cannot honour a caller-supplied attention_mask"):
        fast(images(1, size=64, dtype=torch.float32), attention_mask=mask)
