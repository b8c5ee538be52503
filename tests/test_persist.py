"""save_pretrained / load_pretrained: exact round trip, no pickle, clear errors, atomic files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import images, make_vit

import evit_patch
from evit_patch import CheckpointError
from evit_patch.deploy.persist import CONFIG_NAME, WEIGHTS_NAME


def _finetuned_like(seed: int = 0):
    """A patched model whose weights differ from a fresh init: round trip must carry them. timm's
    6-block test ViT: what is saved and checked is the same for any timm ViT, at a fraction of the
    cost of building, patching and rebuilding DeiT-Tiny."""
    model = evit_patch.apply(make_vit("test_vit", seed=seed, num_classes=10), layers=[2, 5], keep=[0.6, 0.8])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved model, copied by each test that damages it."""
    directory = tmp_path_factory.mktemp("saved")
    evit_patch.save_pretrained(_finetuned_like(), directory)
    return directory


def test_round_trip_is_exact(tmp_path):
    model = _finetuned_like()
    evit_patch.set_keep(model, [0.5, 0.9])  # the live keep rates are what is saved
    evit_patch.save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = evit_patch.load_pretrained(tmp_path / "out")
    assert type(loaded) is type(model) and not loaded.training
    assert evit_patch.get_config(loaded) == evit_patch.get_config(model)
    assert loaded.num_classes == 10 and next(loaded.parameters()).dtype == torch.float64
    x = images(2, size=160)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_config_records_plan_and_architecture(tmp_path):
    evit_patch.save_pretrained(_finetuned_like(), tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["architecture"] == "test_vit"
    assert meta["evit"] == {
        "layers": [2, 5],
        "keep": [0.6, 0.8],
        "fuse": True,
        "score": None,
        "method": "evit",
        "proportional": None,
        "cls_only": False,
        "dense": False,
    }
    assert meta["model_kwargs"] == {
        "num_classes": 10,
        "img_size": [160, 160],
        "global_pool": "token",
    }  # test_vit: 160 px
    assert meta["evit_patch_version"] == evit_patch.__version__


def test_resized_model_round_trips(tmp_path):
    model = evit_patch.apply(make_vit(), layers=[3, 6, 9], keep=0.7, img_size=160)
    evit_patch.save_pretrained(model, tmp_path)
    loaded = evit_patch.load_pretrained(tmp_path)
    x = images(1, size=160)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_unpatched_model_is_refused(tmp_path):
    with pytest.raises(evit_patch.InvalidPlanError, match="not an evit_patch model"):
        evit_patch.save_pretrained(make_vit(), tmp_path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / CONFIG_NAME).unlink(), "no evit_config.json"),
        (lambda d: (d / WEIGHTS_NAME).unlink(), "no model.safetensors"),
        (lambda d: (d / CONFIG_NAME).write_text("{not json"), "not valid JSON"),
        (lambda d: (d / CONFIG_NAME).write_text('{"format": "other"}'), "expected 'evit_patch'"),
        (lambda d: _edit(d, model_kwargs={"num_classes": 7}), "weights do not fit test_vit"),
        (lambda d: _edit(d, format_version=99), "upgrade evit_patch"),
    ],
)
def test_bad_directories_fail_clearly(saved, tmp_path, damage, message):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        evit_patch.load_pretrained(tmp_path)


def _edit(directory, **changes):
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta.update(changes)
    (directory / CONFIG_NAME).write_text(json.dumps(meta))


def test_failed_write_leaves_previous_save_intact(tmp_path, monkeypatch):
    model = _finetuned_like()
    evit_patch.save_pretrained(model, tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        evit_patch.save_pretrained(_finetuned_like(seed=1), tmp_path, overwrite=True)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_model_that_timm_cannot_rebuild_is_refused_before_writing(tmp_path):
    """Built with depth=4, saved without saying so: load_pretrained would fail, so saving does."""
    fast = evit_patch.apply(make_vit("deit_tiny_patch16_224", depth=4), layers=[1], keep=0.7)
    with pytest.raises(evit_patch.CheckpointError, match=r"does not rebuild .* pass the constructor arguments"):
        evit_patch.save_pretrained(fast, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    evit_patch.save_pretrained(fast, tmp_path / "out", model_kwargs={"depth": 4})
    loaded = evit_patch.load_pretrained(tmp_path / "out")
    x = images(1)
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))


def test_average_pooled_beit_round_trips(tmp_path):
    fast = evit_patch.apply(
        make_vit("beit_base_patch16_224", img_size=64, depth=2, embed_dim=64, num_heads=4), layers=[1]
    )
    evit_patch.save_pretrained(fast, tmp_path, model_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 4})
    loaded = evit_patch.load_pretrained(tmp_path)
    x = images(2, size=64)
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))


class _PackedWeight(torch.Tensor):
    """Stands for a quantization library's weight tensor (torchao's ``Int8Tensor`` is one such subclass)."""


def test_quantized_weights_are_refused_by_name_before_writing(tmp_path):
    model = _finetuned_like()
    qkv = model.blocks[0].attn.qkv
    qkv.weight = torch.nn.Parameter(qkv.weight.detach().as_subclass(_PackedWeight), requires_grad=False)
    message = (
        r"^save_pretrained: VisionTransformer \(test_vit\) holds quantized weights \(blocks\.0\.attn\.qkv"
        r"\.weight is a test_persist\._PackedWeight\), which evit_patch does not save; nothing was written\. Save the "
        r"model before quantizing it and quantize after load_pretrained"
    )
    with pytest.raises(CheckpointError, match=message):
        evit_patch.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_torchao_quantized_model_is_refused_before_writing(tmp_path):
    torchao = pytest.importorskip("torchao.quantization", reason="torchao is not installed")
    model = _finetuned_like().float()
    torchao.quantize_(model, torchao.Int8WeightOnlyConfig())
    with pytest.raises(CheckpointError, match=r"holds quantized weights \(blocks\.0\.attn\.qkv\.weight is a torchao\."):
        evit_patch.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_save_is_replaced_only_with_overwrite(tmp_path):
    """One rule with the CLI's --overwrite: a non-empty folder is refused unless overwrite=True, an empty one is not."""
    (tmp_path / "empty").mkdir()
    model = _finetuned_like()
    first = evit_patch.save_pretrained(model, tmp_path / "empty")
    before = (first / WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    with pytest.raises(
        FileExistsError,
        match=rf"^{tmp_path / 'empty'} exists \(a non-empty folder\); pass overwrite=True to replace it, or choose",
    ):
        evit_patch.save_pretrained(model, first)
    assert (first / WEIGHTS_NAME).read_bytes() == before
    evit_patch.save_pretrained(model, first, overwrite=True)
    assert (first / WEIGHTS_NAME).read_bytes() != before
