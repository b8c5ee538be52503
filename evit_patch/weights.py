"""Create a timm model with weights from a local file or the hub, loading nothing executable."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a ``.pth`` checkpoint with ``weights_only=True``.

    timm/DeiT ``.pth`` files that wrap the weights in ``{"model": ...}`` or
    ``{"state_dict": ...}`` are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def create_model(name: str, *, checkpoint: str | Path | None = None, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` in eval mode; ``checkpoint`` loads local weights with ``strict=True``."""
    model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    if checkpoint is not None:
        model.load_state_dict(load_state_dict(checkpoint), strict=True)
    return model.eval()
