"""Local weights for another input size: position embeddings resampled as timm does (issue 15, item 10)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from evit_patch import CheckpointError
from evit_patch.deploy.weights import create_model

pytestmark = pytest.mark.xdist_group("weights")  # one worker: the module fixture is built once


@pytest.fixture(scope="module")
def weights_224(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=2)
    path = tmp_path_factory.mktemp("w") / "deit_tiny_224.safetensors"
    save_file(model.state_dict(), str(path))
    return path, model.state_dict()


def test_position_embeddings_are_resampled_for_another_size(weights_224):
    path, state = weights_224
    model = create_model("deit_tiny_patch16_224", checkpoint=path, img_size=160, depth=2)
    expected = resample_abs_pos_embed(state["pos_embed"], (10, 10), num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 101, 192)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(
        model.blocks[1].mlp.fc1.weight.detach(), state["blocks.1.mlp.fc1.weight"], rtol=0, atol=0
    )


def test_same_size_loads_unchanged(weights_224):
    path, state = weights_224
    model = create_model("deit_tiny_patch16_224", checkpoint=path, depth=2)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_other_architecture_is_still_refused(weights_224):
    path, _ = weights_224
    with pytest.raises(
        CheckpointError, match=r"weights do not fit timm model 'deit_tiny_patch16_224' \{'depth': 4\}: "
    ):
        create_model("deit_tiny_patch16_224", checkpoint=path, depth=4)


def test_finetune_at_another_size_from_224_weights(tmp_path):
    """docs/planning.md's same-cost resolution needs this fine-tune (it failed on a strict-load size mismatch)."""
    from conftest import WEIGHTS
    from test_train import write_images

    from evit_patch import cli

    if not WEIGHTS.is_file():
        pytest.skip(f"real weights not found at {WEIGHTS}")
    write_images(tmp_path / "data", classes=("n01440764",), per_class=4, size=72)
    argv = ["finetune", "--model", "deit_tiny_patch16_224", "--checkpoint", WEIGHTS, "--img-size", "64"]
    argv += ["--data-dir", tmp_path / "data", "--output", tmp_path / "run", "--batch-size", "2", "--max-steps", "1"]
    assert cli.main([*map(str, argv), "--workers", "0", "--keep", "0.5"]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
