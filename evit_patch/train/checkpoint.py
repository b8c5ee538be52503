"""Resumable checkpoints, swapped in atomically, and the check that a resume continues the same run.

``<output>/checkpoints/step_00000123/`` holds ``model.safetensors`` + ``evit_config.json``
(:func:`evit_patch.save_pretrained`'s format, at the keep rate of that step) and
``train_state.pt``: optimizer, grad scaler, step, epoch, batch position, every rank's RNG
states and the run's identity, as plain tensors and containers loaded with
``torch.load(weights_only=True)``. A checkpoint is written into a hidden temporary directory and
renamed into place; older ones are removed only afterwards, and resuming takes the highest
complete step, so a kill at any moment leaves a whole checkpoint behind.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..deploy.atomic import make_temporary_dir
from ..deploy.persist import WEIGHTS_NAME, load_weights_file, read_config, save_pretrained, verify_weights
from ..errors import CheckpointError

CHECKPOINTS = "checkpoints"
STATE_NAME = "train_state.pt"
_PREFIX = "step_"


def _fsync_files(directory: Path) -> None:
    """Flush the files to disk before the rename publishes them (power loss, not just a kill)."""
    for path in directory.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def complete(output: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are not listed)."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(_PREFIX)))


def remove_partial(output: str | os.PathLike) -> None:
    """Delete temporary directories a killed save left behind."""
    root = Path(output) / CHECKPOINTS
    for path in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def save(output: str | os.PathLike, step: int, model: nn.Module, state: dict, *, keep_last: int = 1) -> Path:
    """Write checkpoint ``step`` of ``model`` and ``state``; keep the newest ``keep_last``."""
    root = Path(output) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    if final.exists():  # this step is already saved (e.g. an epoch ends on a --checkpoint-every step)
        return final
    tmp = make_temporary_dir(root, f".tmp-{final.name}-")
    try:
        save_pretrained(model, tmp)
        torch.save(state, tmp / STATE_NAME)
        _fsync_files(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete(output)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(output: str | os.PathLike) -> Path:
    """The newest complete checkpoint of the run in ``output``; a clear error when there is none."""
    found = complete(output)
    if not found:
        raise CheckpointError(
            f"--resume {output}: no checkpoint found (expected {Path(output) / CHECKPOINTS}/{_PREFIX}*/{STATE_NAME})"
        )
    return found[-1]


def load_state(directory: Path) -> dict:
    """The training state of a checkpoint, unpickling nothing but tensors and plain containers."""
    try:
        return torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{directory / STATE_NAME}: cannot be read as a training state ({exc})") from exc


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load a checkpoint's safetensors weights into ``model`` strictly, after checking their checksum."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME}")
    verify_weights(weights, read_config(directory))
    load_weights_file(model, weights, "this model")


def check_same_run(saved: dict, current: dict, directory: Path) -> None:
    """Refuse to resume a checkpoint of another model, plan, teacher or data order."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"--resume {directory}: this checkpoint belongs to a different run; " + "; ".join(diffs))


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain values (``weights_only``-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
