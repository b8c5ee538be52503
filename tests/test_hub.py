"""Hub push and pull, offline: a fake ``HfApi`` records the upload; the files are laid in a local
Hugging Face cache exactly where ``snapshot_download`` finds them with ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import images, make_vit
from huggingface_hub import constants

import evit_patch
from evit_patch import CheckpointError
from evit_patch.deploy.persist import CONFIG_NAME, WEIGHTS_NAME

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHfApi:
    """Records what ``push_to_hub`` asks of the Hub; keeps a copy of every uploaded file."""

    calls: list[tuple[str, dict]] = []
    uploaded: dict[str, bytes] = {}

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        self.uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.calls, FakeHfApi.uploaded = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def _cache(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay ``files`` out as huggingface_hub's cache holds a downloaded snapshot of ``repo_id``'s main."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def _model():
    return evit_patch.apply(make_vit(num_classes=10), layers=[2, 5], keep=[0.6, 0.8])


def test_push_uploads_the_save_pretrained_files(fake_hub):
    result = evit_patch.push_to_hub(_model(), "alice/deit-tiny-evit", private=True, token="hf_x")
    assert result == f"https://huggingface.co/alice/deit-tiny-evit/commit/{COMMIT}"
    assert [name for name, _ in fake_hub.calls] == ["init", "create_repo", "upload_folder"]
    assert fake_hub.calls[0][1] == {"token": "hf_x"}
    assert fake_hub.calls[1][1] == {"repo_id": "alice/deit-tiny-evit", "private": True, "exist_ok": True}
    assert fake_hub.calls[2][1]["allow_patterns"] == [CONFIG_NAME, WEIGHTS_NAME]
    assert sorted(fake_hub.uploaded) == [CONFIG_NAME, WEIGHTS_NAME]


def test_pushed_files_load_back_from_the_offline_cache(fake_hub, tmp_path, monkeypatch):
    assert constants.HF_HUB_OFFLINE  # conftest: no test reaches the network
    model = _model()
    evit_patch.push_to_hub(model, "alice/deit-tiny-evit")
    _cache(tmp_path, "alice/deit-tiny-evit", fake_hub.uploaded)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = evit_patch.load_pretrained("alice/deit-tiny-evit")
    assert evit_patch.get_config(loaded) == evit_patch.get_config(model)
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_repo_missing_from_the_offline_cache_fails_clearly(tmp_path):
    with pytest.raises(
        CheckpointError, match="nobody/missing: no such directory, and the Hub repo is not in the local"
    ):
        evit_patch.load_pretrained("nobody/missing", cache_dir=tmp_path)


def test_missing_directory_that_is_no_repo_id_fails_clearly(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(CheckpointError, match="no such directory, and not a Hugging Face Hub repo id"):
        evit_patch.load_pretrained(missing)


def test_cached_repo_without_the_config_names_what_is_missing(tmp_path):
    _cache(tmp_path, "alice/other-model", {"pytorch_model.bin": b"not ours"})
    with pytest.raises(CheckpointError, match="no evit_config.json; expected a directory written by save_pretrained"):
        evit_patch.load_pretrained("alice/other-model", cache_dir=tmp_path)
