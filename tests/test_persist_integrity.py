"""save_pretrained records a checksum; load_pretrained refuses corrupt files and malformed configs
by name (issue 15, items 3, 12, 14)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from cases import small_open_clip, small_torchvision
from conftest import images, make_vit
from safetensors.torch import save_file
from test_export_defaults import small_hf

import evit_patch
from evit_patch import CheckpointError
from evit_patch.deploy.persist import CONFIG_NAME, WEIGHTS_NAME
from evit_patch.train import checkpoint


def _saved(tmp_path):
    model = evit_patch.apply(make_vit(img_size=64, depth=4, num_classes=10), layers=[1, 2], keep=0.7)
    evit_patch.save_pretrained(model, tmp_path, model_kwargs={"depth": 4})
    return model


def _edit(directory, **changes):
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta.update(changes)
    (directory / CONFIG_NAME).write_text(json.dumps(meta))


def _flip(path, offset, length=4096):
    data = bytearray(path.read_bytes())
    data[offset : offset + length] = bytes(b ^ 0xFF for b in data[offset : offset + length])
    path.write_bytes(bytes(data))


def test_checksum_is_recorded(tmp_path):
    _saved(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["weights_sha256"] == hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest()


def test_flipped_bytes_in_the_weights_are_refused(tmp_path):
    _saved(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    _flip(weights, weights.stat().st_size // 2)
    with pytest.raises(
        CheckpointError,
        match=rf"^{re.escape(str(weights))}: SHA-256 [0-9a-f]{{64}} does not match [0-9a-f]{{64}} recorded in "
        r"evit_config.json; the file is corrupt or was replaced after saving$",
    ):
        evit_patch.load_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_unreadable_weights_name_the_file(tmp_path, damage):
    """Also without a recorded checksum (files saved before there was one)."""
    _saved(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    del meta["weights_sha256"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    weights = tmp_path / WEIGHTS_NAME
    if damage == "header":
        _flip(weights, 8, 64)
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(weights))}: not a readable safetensors file \("):
        evit_patch.load_pretrained(tmp_path)


def test_training_checkpoint_weights_are_verified(tmp_path):
    model = evit_patch.apply(make_vit(img_size=64, num_classes=10), layers=[1, 2], keep=0.7)
    saved = checkpoint.save(tmp_path, 1, model, {"step": 1})
    _flip(saved / WEIGHTS_NAME, (saved / WEIGHTS_NAME).stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model.safetensors: SHA-256 .* does not match"):
        checkpoint.load_weights(model, saved)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"architecture": "no_such_model"},
            r"'architecture' 'no_such_model' with 'model_kwargs' \{.*\} cannot be built by timm.create_model "
            r"\(RuntimeError: Unknown model \(no_such_model\)\)",
        ),
        (
            {"model_kwargs": {"depth": 4, "no_such_option": 1}},
            r"'architecture' 'deit_tiny_patch16_224' with 'model_kwargs' \{.*'no_such_option': 1\} cannot be built "
            r"by timm.create_model \(TypeError: ",
        ),
        ({"model_kwargs": [4]}, r"'model_kwargs' must be an object of constructor arguments, got \[4\]"),
        ({"evit": {}}, r"'evit' must hold the plan's 'layers' and 'keep', got \{\}"),
        (
            {"evit": {"layers": [1, 2], "keep": [0.7, 0.7], "fuse": "no"}},
            r"'evit' \{.*\} cannot be applied to 'deit_tiny_patch16_224': .*fuse must be True or False, got 'no'",
        ),
        (
            {"evit": {"layers": [9], "keep": [0.7]}},
            r"'evit' \{.*\} cannot be applied to 'deit_tiny_patch16_224': .*layer 9 is out of range",
        ),
    ],
)
def test_malformed_configs_name_the_file_and_key(tmp_path, changes, message):
    _saved(tmp_path)
    _edit(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / CONFIG_NAME))}: {message}"):
        evit_patch.load_pretrained(tmp_path)


def test_round_trip_still_exact(tmp_path):
    model = _saved(tmp_path)
    loaded = evit_patch.load_pretrained(tmp_path)
    x = images(2, size=64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("library", ["torchvision", "transformers"])
def test_torchvision_and_transformers_models_round_trip(tmp_path, library):
    """Each family records how its library rebuilds the architecture (a class and its arguments)."""
    model = small_torchvision() if library == "torchvision" else small_hf(torch.float64)
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.6, method="merge")
    evit_patch.save_pretrained(fast, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["family"] == evit_patch.families.find_family(model).name
    loaded = evit_patch.load_pretrained(tmp_path)
    x = images(2, size=64)
    with torch.no_grad():
        got, want = loaded(x), fast(x)
    if library == "transformers":
        got, want = got.logits, want.logits
    assert torch.equal(got, want) and evit_patch.get_config(loaded) == evit_patch.get_config(fast)


def test_open_clip_towers_are_told_what_works(tmp_path):
    fast = evit_patch.apply(small_open_clip(), layers=[1], keep=0.7)
    with pytest.raises(
        CheckpointError,
        match=r"^save_pretrained: evit_patch does not know how to rebuild VisionTransformer "
        r"\(open_clip.VisionTransformer\) from a file; save the whole model with torch.save\(model, path\)",
    ):
        evit_patch.save_pretrained(fast, tmp_path)
    assert not any(tmp_path.iterdir())


def test_weights_file_not_safetensors_is_named(tmp_path):
    _saved(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / WEIGHTS_NAME))
    _edit(tmp_path, weights_sha256=hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match=r"model.safetensors: weights do not fit deit_tiny_patch16_224 with"):
        evit_patch.load_pretrained(tmp_path)
