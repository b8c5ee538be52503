"""Files written atomically and checkpoint folders get the mode the umask gives, not tempfile's 0600/0700
(issue 15, item 9)."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import make_vit

import evit_patch
from evit_patch.deploy.atomic import write_atomically
from evit_patch.deploy.persist import CONFIG_NAME, WEIGHTS_NAME
from evit_patch.train import checkpoint


@pytest.fixture(params=[0o022, 0o002, 0o077])
def mask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomically_honours_the_umask(tmp_path, mask):
    target = tmp_path / "file.bin"
    write_atomically(target, lambda tmp: open(tmp, "wb").write(b"x"))
    assert _mode(target) == 0o666 & ~mask
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    assert _mode(target) == _mode(plain)


def test_saved_models_and_checkpoints_honour_the_umask(tmp_path, mask):
    model = evit_patch.apply(make_vit(img_size=64, num_classes=10), layers=[1], keep=0.7)
    evit_patch.save_pretrained(model, tmp_path / "saved")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert _mode(tmp_path / "saved" / name) == 0o666 & ~mask
    folder = checkpoint.save(tmp_path / "run", 1, model, {"step": 1})
    assert _mode(folder) == 0o777 & ~mask
    assert _mode(folder / WEIGHTS_NAME) == 0o666 & ~mask
