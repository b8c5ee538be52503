"""Save a patched model as safetensors + JSON, and load it back with one call, never unpickling.

A directory holds ``model.safetensors`` (the weights, same keys as the unpatched model) and
``evit_config.json`` (the model family, the base architecture and its constructor arguments as
the family records them, the EViT plan, the evit_patch version). Loading rebuilds the base model
with its library (:meth:`Family.rebuild`: timm, torchvision, transformers), re-applies the plan
and loads the weights strictly, so the file format does not depend on traced-graph internals.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..config import EViTConfig
from ..errors import CheckpointError, EViTError
from ..families import Family, Recipe, describe, family_named, find_family
from ..graph.state import get_config
from ..version import __version__
from .atomic import write_atomically
from .download import resolve

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "evit_config.json"
FORMAT = "evit_patch"
FORMAT_VERSION = 1


def _check_rebuilds(model: nn.Module, family: Family, recipe: Recipe) -> None:
    """Refuse to save what ``load_pretrained`` could not rebuild (before anything is written)."""
    what = f"{recipe.architecture} with {recipe.model_kwargs}"
    try:
        with torch.device("meta"):
            rebuilt = family.rebuild(recipe, "save_pretrained")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; pass architecture= and model_kwargs= that rebuild this model") from exc
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        differ = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        shown = ", ".join(f"{k}: {want.get(k)} here vs {got.get(k)} rebuilt" for k in differ[:3])
        raise CheckpointError(
            f"save_pretrained: {what} does not rebuild {describe(model)} ({len(differ)} tensors differ; {shown}); "
            "pass the constructor arguments it was built with as model_kwargs="
        )


def check_plain_tensors(model: nn.Module, where: str = "save_pretrained") -> None:
    """Refuse, naming the first one, weights that are not plain tensors: quantized ones (torchao's
    tensor subclasses such as ``Int8Tensor``, ``torch.ao`` quantized dtypes), which safetensors
    cannot write and ``load_pretrained`` could not rebuild."""
    for name, tensor in model.state_dict().items():
        plain = isinstance(tensor, torch.Tensor) and type(tensor) in (torch.Tensor, nn.Parameter)
        if plain and not tensor.is_quantized:
            continue
        kind = f"{type(tensor).__module__}.{type(tensor).__qualname__}"
        if plain:
            kind = f"quantized tensor ({tensor.dtype})"
        raise CheckpointError(
            f"{where}: {describe(model)} holds quantized weights ({name} is a {kind}), which evit_patch does not "
            "save; nothing was written. Save the model before quantizing it and quantize after load_pretrained, "
            "or save the whole model with torch.save(model, path)"
        )


def check_overwrite(path: Path, overwrite: bool, flag: str = "overwrite=True") -> None:
    """Refuse to replace an existing file, or a non-empty folder, unless ``overwrite`` (the one rule of
    ``save_pretrained``, ``export_onnx`` and the CLI's ``--overwrite``)."""
    exists = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if exists and not overwrite:
        kind = "a non-empty folder" if path.is_dir() else "a file"
        raise FileExistsError(f"{path} exists ({kind}); pass {flag} to replace it, or choose another path")


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    architecture: str | None = None,
    model_kwargs: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a patched ``model`` to ``directory`` (created if needed); returns the directory.

    Args:
        model: a model returned by :func:`evit_patch.apply` (possibly fine-tuned).
        directory: where ``model.safetensors`` and ``evit_config.json`` go.
        architecture: what the model's library builds it by: for timm the model name (default
            ``model.pretrained_cfg["architecture"]``); torchvision and transformers models record
            their class and constructor arguments themselves.
        model_kwargs: extra constructor arguments, merged over the detected ones (timm:
            ``num_classes``, ``img_size`` and ``global_pool``).
        overwrite: replace the files of a ``directory`` that is not empty; without it such a
            directory is refused (as the CLI's ``--overwrite``).

    Raises:
        CheckpointError: ``timm.create_model(architecture, **model_kwargs)`` would not rebuild
            this model (checked on the meta device, before anything is written), or its weights
            are quantized.
        FileExistsError: ``directory`` exists and is not empty, and ``overwrite`` is not set.
    """
    from safetensors.torch import save_model

    config = get_config(model)
    directory = Path(directory)
    check_overwrite(directory, overwrite)
    check_plain_tensors(model)
    family = find_family(model)
    recipe = family.recipe(model, architecture, model_kwargs)
    _check_rebuilds(model, family, recipe)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "evit_patch_version": _version(),
        "family": family.name,
        "architecture": recipe.architecture,
        "model_kwargs": recipe.model_kwargs,
        "evit": config.to_dict(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    directory.mkdir(parents=True, exist_ok=True)

    def write_weights(tmp: str) -> None:
        save_model(model, tmp, metadata={"format": "pt"})
        meta["weights_sha256"] = sha256(tmp)

    write_atomically(directory / WEIGHTS_NAME, write_weights)
    write_atomically(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    """The validated ``evit_config.json`` of a saved model."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; expected a directory written by save_pretrained")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: format is {meta.get('format') if isinstance(meta, dict) else meta!r}, expected {FORMAT!r}"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta['format_version']} is newer than this evit_patch reads "
            f"({FORMAT_VERSION}); upgrade evit_patch"
        )
    for key in ("architecture", "evit"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing {key!r}")
    return meta


def load_pretrained(
    directory: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> nn.Module:
    """Rebuild the patched model saved in ``directory``: timm architecture, EViT plan, weights.

    Nothing pickled is executed: the weights are safetensors, the rest is JSON. The model is
    returned in eval mode.

    Args:
        directory: a folder written by :func:`save_pretrained`, or a Hugging Face Hub repo id
            (``"user/name"``, see :func:`push_to_hub`) when no such folder exists.
        revision: Hub only: branch, tag or commit; default the main branch.
        cache_dir: Hub only: the download cache; default Hugging Face's.
        local_files_only: Hub only: read the cache, never download (as ``HF_HUB_OFFLINE=1``).

    Raises:
        CheckpointError: the files are missing, malformed or do not fit the architecture, or the
            repo cannot be found.
    """
    from ..pipeline import apply

    directory = resolve(
        directory,
        [CONFIG_NAME, WEIGHTS_NAME],
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    meta = read_config(directory)
    config_path = Path(directory) / CONFIG_NAME
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} next to {CONFIG_NAME}")
    verify_weights(weights, meta)
    dtype = getattr(torch, str(meta.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{directory}: unknown dtype {meta.get('dtype')!r} in {CONFIG_NAME}")
    model = _rebuild(meta, config_path, dtype, apply)
    load_weights_file(model, weights, f"{meta['architecture']} with {meta.get('model_kwargs')}")
    return model.eval()


def _rebuild(meta: dict, path: Path, dtype: torch.dtype, apply) -> nn.Module:
    """The architecture of ``evit_config.json`` at ``path``, patched with its plan; errors name the key.
    Files without a ``family`` (written before families recorded their own recipes) are timm's."""
    architecture, kwargs, evit = meta["architecture"], meta.get("model_kwargs", {}), meta["evit"]
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: 'model_kwargs' must be an object of constructor arguments, got {kwargs!r}")
    family = family_named(meta.get("family", "timm.VisionTransformer"), str(path))
    base = family.rebuild(Recipe(architecture, kwargs), str(path))
    if not isinstance(evit, dict) or not {"layers", "keep"} <= evit.keys():
        raise CheckpointError(f"{path}: 'evit' must hold the plan's 'layers' and 'keep', got {evit!r}")
    try:
        config = EViTConfig.from_dict(evit)
        return apply(base.to(dtype), layers=config.layers, keep=config.keep, **config.options())
    except EViTError as exc:
        raise CheckpointError(f"{path}: 'evit' {evit} cannot be applied to {architecture!r}: {exc}") from exc


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights(weights: Path, meta: dict) -> None:
    """Compare ``weights`` with the checksum ``evit_config.json`` recorded (files saved before
    evit_patch recorded one are not checked)."""
    expected = meta.get("weights_sha256")
    if expected is None:
        return
    found = sha256(weights)
    if found != expected:
        raise CheckpointError(
            f"{weights}: SHA-256 {found} does not match {expected} recorded in {CONFIG_NAME}; the file is "
            "corrupt or was replaced after saving"
        )


def load_weights_file(model: nn.Module, weights: Path, what: str) -> None:
    """Load safetensors ``weights`` into ``model`` strictly; a corrupt file or a misfit names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(model, str(weights), strict=True)
    except SafetensorError as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not fit {what}: {exc}") from exc


def _version() -> str:
    return __version__
