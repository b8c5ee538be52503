"""How far a candidate plan moves a model's outputs, on fixed images: what searched plans minimise.

One copy of the model is patched at every block; a candidate plan is a keep rate per block (1.0
where it does not reorganize), set with ``set_keep``: nothing is re-traced while plans are compared.
Classifiers are compared by KL(original || patched) of their class distributions, embedding models
(no classifier: ``num_classes=0``, ``pooler_output``, CLIP towers) by ``1 - cosine``. A model
patched with ``dense=True`` is compared by what a dense head reads: the last restorable block's
output, restored to the full grid, by ``1 -`` the mean per-patch cosine (the last block a dense head
can read is the most reduced one, so it bounds every other).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import EViTConfig
from ..errors import UnsupportedInputError
from ..families import find_family
from ..graph.state import restore, set_keep

_EMBEDDINGS = ("image_embeds", "pooler_output", "last_hidden_state")


def primary_output(output: object) -> tuple[Tensor, bool]:
    """``(tensor, is_logits)``: what a model's output is compared by. A classifier's logits (a tensor, or
    the ``logits`` of a transformers output), else its embedding (the first tensor of a tuple,
    ``image_embeds``, ``pooler_output``; the class token of ``last_hidden_state``)."""
    if isinstance(output, Tensor):
        return output, True
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        if output.get("logits") is not None:
            return output["logits"], True
        for key in _EMBEDDINGS:
            value = output.get(key)
            if isinstance(value, Tensor):
                return (value[:, 0] if value.dim() == 3 else value), False
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0], False
    raise UnsupportedInputError(f"evit_patch: cannot tell what to compare in a model output of type {type(output)}")


def patch_divergence(reference: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``(1 - mean per-patch cosine, mean cosine > 0.9)`` of ``(B, N, C)`` token grids."""
    cosine = F.cosine_similarity(reference.float(), output.float(), dim=-1).mean(-1)
    return 1 - cosine, (cosine > 0.9).float()


class BlockOutput:
    """The output of one block, by a forward hook, for each call of ``model`` made inside ``with``;
    ``restored``: through :func:`~evit_patch.restore` (a dense patched model)."""

    def __init__(self, model: nn.Module, index: int, restored: bool) -> None:
        self.model, self.restored = model, restored
        self.block = find_family(model).blocks(model)[index][1]
        self.value: Tensor | None = None

    def __enter__(self) -> BlockOutput:
        self.handle = self.block.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _keep(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.value = restore(output, self.model) if self.restored else output


def divergence(reference: Tensor, output: Tensor, logits: bool) -> tuple[Tensor, Tensor]:
    """Per-sample ``(distance, agreement)``: KL of the class distributions and argmax agreement for
    logits; ``1 - cosine`` and ``cosine > 0.9`` for embeddings."""
    if logits:
        ref, out = reference.float().log_softmax(-1), output.float().log_softmax(-1)
        kl = F.kl_div(out, ref, log_target=True, reduction="none").sum(-1)
        return kl, (out.argmax(-1) == ref.argmax(-1)).float()
    cosine = F.cosine_similarity(reference.float().flatten(1), output.float().flatten(1))
    return 1 - cosine, (cosine > 0.9).float()


class Objective:
    """Mean distance to the original on fixed images, for any per-block keep vector, memoised."""

    def __init__(self, model: nn.Module, images: Tensor, batch_size: int, every: EViTConfig) -> None:
        from ..pipeline import patch_with  # upward import (inside the function): plans are compared on patched models

        if not images.is_floating_point() or images.dim() != 4:
            raise UnsupportedInputError(
                f"{type(model).__name__}: expected preprocessed float images (B, C, H, W), got a {images.dtype} "
                f"tensor of shape {tuple(images.shape)}"
            )
        self.depth = len(every.layers)
        self.patched = patch_with(model, every)
        self.batches = images.split(batch_size)
        self.block = _restorable_block(self.patched, self.batches[0][:1]) if every.dense else None
        with torch.inference_mode():
            if self.block is None:
                outputs = [primary_output(model(x)) for x in self.batches]
            else:
                outputs = []
                with BlockOutput(model, self.block, restored=False) as seen:
                    for x in self.batches:
                        model(x)
                        outputs.append((seen.value, False))
        self.reference = [o for o, _ in outputs]
        self.logits = outputs[0][1]
        self.cache: dict[tuple, tuple[float, float]] = {}

    def __call__(self, layers: tuple[int, ...], keeps: tuple[float, ...]) -> tuple[float, float]:
        """``(mean distance, agreement)`` of the plan keeping ``keeps`` at ``layers``."""
        key = (layers, keeps)
        if key not in self.cache:
            per_block = dict(zip(layers, keeps))
            set_keep(self.patched, [per_block.get(i, 1.0) for i in range(self.depth)])
            distance = agree = 0.0
            with torch.inference_mode():
                for x, ref in zip(self.batches, self.reference):
                    if self.block is None:
                        d, a = divergence(ref, primary_output(self.patched(x))[0], self.logits)
                    else:
                        with BlockOutput(self.patched, self.block, restored=True) as seen:
                            self.patched(x)
                        d, a = patch_divergence(ref, seen.value)
                    distance, agree = distance + d.sum().item(), agree + a.sum().item()
            count = sum(len(x) for x in self.batches)
            self.cache[key] = (distance / count, agree / count)
        return self.cache[key]


def _restorable_block(patched: nn.Module, x: Tensor) -> int:
    """The last block of a dense patched model whose output restores: the last one, or the one before
    where a class-token head reads the last block's tokens without their record (CLIP)."""
    blocks = find_family(patched).blocks(patched)
    set_keep(patched, 0.5)  # every block reorganizes: which outputs carry their record shows
    try:
        with torch.inference_mode():
            for index in (len(blocks) - 1, len(blocks) - 2):
                try:
                    with BlockOutput(patched, index, restored=True):
                        patched(x)
                except UnsupportedInputError:
                    continue
                return index
    finally:
        set_keep(patched, 1.0)
    raise UnsupportedInputError(f"{type(patched).__name__}: no block output restores to the patch grid")
