"""Genuine pretrained DeiT-Tiny on real ImageNet images (../shared/data): the 75 val images and
every third of the 750 sample images (325, the ``real_images`` fixture).

Bounds were measured with this code (torch 2.14.1, timm 1.0.31, CPU): original top-1 72.0 % on the
75 val images (DeiT-Tiny's published 72.2 % on the full val set) and 83.6 % on the 250 sample
images (79.6 % on all 750); keep 0.7 @3,6,9 top-1 76.9 % and agreement 88.0 % over the 325 (74.3 %
and 88.6 % over all 825). The bounds leave about one percentage point for platform float differences.
"""

from __future__ import annotations

import pytest
import torch

import evit_patch

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("real_weights")]  # one worker: the module fixture is built once


@pytest.fixture(scope="module")
def original_logits(real_model, real_images):
    x, _, _ = real_images
    with torch.inference_mode():
        return torch.cat([real_model(x[i : i + 128]) for i in range(0, len(x), 128)])


def _top1(logits, labels):
    return (logits.argmax(-1) == labels).float().mean().item()


def test_unpatched_accuracy_matches_published(real_images, original_logits):
    _, y, n_val = real_images
    assert 0.70 <= _top1(original_logits[:n_val], y[:n_val]) <= 0.74  # DeiT-Tiny: 72.2 % on full val
    assert 0.825 <= _top1(original_logits[n_val:], y[n_val:]) <= 0.845


def test_keep_07_accuracy_and_agreement(real_model, real_images, original_logits):
    x, y, _ = real_images
    before = {k: v.clone() for k, v in real_model.state_dict().items()}
    fast = evit_patch.apply(real_model, layers=[3, 6, 9], keep=0.7)
    with torch.inference_mode():
        logits = torch.cat([fast(x[i : i + 128]) for i in range(0, len(x), 128)])
    agreement = (logits.argmax(-1) == original_logits.argmax(-1)).float().mean().item()
    assert 0.865 <= agreement <= 0.895
    assert 0.755 <= _top1(logits, y) <= _top1(original_logits, y) - 0.02
    # A backward pass through the patched copy leaves the pretrained model as it was.
    fast.train()
    fast(x[:8]).logsumexp(-1).sum().backward()
    assert fast.blocks[3].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in real_model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in real_model.state_dict().items())


def test_keep_one_reproduces_real_logits_exactly(real_model, real_images, original_logits):
    x, _, _ = real_images
    fast = evit_patch.apply(real_model, layers=[3, 6, 9], keep=1.0)
    with torch.inference_mode():
        assert torch.equal(fast(x[:8]), original_logits[:8])
