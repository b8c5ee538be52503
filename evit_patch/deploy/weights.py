"""Create a timm model with weights from a local file or the hub, loading nothing executable."""

from __future__ import annotations

import pickle
from pathlib import Path

import timm
import torch
from torch import nn

from ..errors import CheckpointError, UnsupportedModelError


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a ``.pth`` checkpoint with ``weights_only=True``.

    timm/DeiT ``.pth`` files that wrap the weights in ``{"model": ...}`` or
    ``{"state_dict": ...}`` are unwrapped.

    Raises:
        FileNotFoundError: there is no such file.
        CheckpointError: ``path`` is a directory, or the file is not a readable safetensors file or
            weights-only checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory; expected a .safetensors or .pth weights file (a folder written by "
            "save_pretrained loads with evit_patch.load_pretrained, or the CLI's --load)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a weights file (expected .safetensors, or a .pth that torch.load reads with "
            f"weights_only=True): {str(exc).splitlines()[0]}"
        ) from exc
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return state


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` loads into ``model`` strictly; say how it differs."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    shapes = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (e.g. {k}: {got[k]} in the file, {want[k]} in the model)")
    raise CheckpointError(f"{where}: " + ", ".join(parts) + "; is it a checkpoint of another architecture?")


def create_model(name: str, *, checkpoint: str | Path | None = None, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` in eval mode; ``checkpoint`` loads local weights with ``strict=True``.

    Raises:
        UnsupportedModelError: timm has no model ``name``.
        CheckpointError: ``checkpoint`` is not a weights file, or its weights do not fit ``name``.
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"
        raise UnsupportedModelError(f"timm has no model named {name!r}{hint}")
    state = load_state_dict(checkpoint) if checkpoint is not None else None
    model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    if state is not None:
        state = _resampled(model, state)
        check_fits(model, state, f"{checkpoint}: weights do not fit timm model {name!r} {kwargs or ''}".rstrip())
        model.load_state_dict(state, strict=True)
    return model.eval()


def _resampled(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights for another input size (``img_size=``) resampled as timm's own pretrained loading does:
    the family's ``checkpoint_filter_fn`` interpolates position embeddings (and relative tables)."""
    import sys

    own = model.state_dict()
    if all(k in own and tuple(own[k].shape) == tuple(v.shape) for k, v in state.items()):
        return state
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(dict(state), model)
    except Exception:  # not a layout the filter knows: report the mismatch as it is
        return state
