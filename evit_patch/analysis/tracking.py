"""Which original patches every token stands for after EViT's reorganizations.

Each reorganizing block re-orders the image tokens it keeps by score and fuses the rest into
one token (or merges each into a kept token), which later blocks may keep or fuse again.
:func:`track_tokens` follows every token back to the image patches it came from without touching
the patched model: a forward hook on each reorganizer's ``published`` module receives what the
reorganizer's reduction decided (its :class:`~evit_patch.reductions.Mix`), and the stages are composed.
Nothing here re-derives which tokens survive.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import EViTError, UnsupportedInputError
from ..families import describe, find_family
from ..graph.reorganizer import TokenReorganizer
from ..graph.state import _require_patched
from ..reductions import Mix, mixing


class PatchStatus(enum.IntEnum):
    """Where an original patch is after a stage."""

    KEPT = 0
    """Still a token of its own."""
    FUSED_HERE = 1
    """Part of the fused token this stage made."""
    FUSED_EARLIER = 2
    """Part of a fused token made at an earlier stage that this stage kept."""
    DROPPED = 3
    """In no token any more (``fuse=False``)."""


@dataclass(frozen=True)
class Stage:
    """One reorganizing block as a batch of tokens went through it.

    ``T`` image tokens enter the stage, ``k`` are kept, ``T'`` = ``k`` (+1 with a fused token)
    leave it, and ``G`` is the number of patches of the input image. Prefix tokens are never
    dropped or moved, so only image tokens are tracked.
    """

    layer: int
    """The block's index."""
    keep: float
    """The keep rate the block ran with."""
    scores: Tensor
    """``(B, T)`` head-averaged [CLS] attention over the entering image tokens."""
    kept_index: Tensor
    """``(B, k)`` index of each kept token among the entering image tokens, by descending score
    (``0..T-1`` in order for a stage whose keep rate keeps everything)."""
    fused: bool
    """Whether the stage appended a fused token (the last of its output tokens)."""
    origin: Tensor
    """``(B, T')`` the original patch (raster order) each output token is, ``-1`` for a token that
    is a fusion of several (EViT's fused token, or a token others were merged into)."""
    members: Tensor
    """``(B, T', G)`` bool: the original patches each output token stands for."""
    is_fused: Tensor
    """``(B, T')`` bool: the output token is a fused token, made at this stage or kept from an earlier one."""
    weights: Tensor
    """``(B, T', G)`` float64 fusion weights composed over the stages: token ``t`` would be
    ``sum_p weights[t, p] * patch_p`` if the blocks in between left tokens unchanged. One-hot for a
    token that is still its own patch."""
    grew: Tensor
    """``(B, T')`` bool: the output token took in dropped tokens at this stage (the fused token,
    or a kept token others were merged into)."""

    def patch_status(self) -> Tensor:
        """``(B, G)`` :class:`PatchStatus` of every original patch after this stage."""
        row = self.members.to(torch.uint8).argmax(dim=1)  # tokens stand for disjoint sets of patches
        status = torch.full_like(row, PatchStatus.KEPT)
        status[self.is_fused.gather(1, row)] = PatchStatus.FUSED_EARLIER
        status[self.grew.gather(1, row)] = PatchStatus.FUSED_HERE
        status[~self.members.any(dim=1)] = PatchStatus.DROPPED
        return status


@dataclass(frozen=True)
class TokenTrace:
    """What :func:`track_tokens` saw: the model's output and one :class:`Stage` per reorganizing block."""

    logits: Tensor
    """The patched model's output for the batch."""
    grid: tuple[int, int]
    """``(rows, columns)`` of the patch grid; patch ``p`` is at row ``p // columns``."""
    num_prefix_tokens: int
    stages: tuple[Stage, ...]

    def members_before(self, index: int) -> Tensor:
        """``(B, T, G)`` bool: the original patches each token entering stage ``index`` stands for."""
        if index > 0:
            return self.stages[index - 1].members
        batch, tokens = self.stages[0].scores.shape
        return torch.eye(tokens, dtype=torch.bool, device=self.stages[0].scores.device).expand(batch, -1, -1)

    def patch_attention(self, index: int) -> Tensor:
        """``(B, G)`` [CLS] attention of stage ``index`` per original patch.

        A token standing for several patches spreads its score evenly over them (attention per
        patch area); patches no longer represented by any token get 0.
        """
        members = self.members_before(index).to(self.stages[index].scores.dtype)
        per_patch = self.stages[index].scores / members.sum(-1).clamp(min=1)
        return (per_patch.unsqueeze(1) @ members).squeeze(1)


class _Recorder:
    """Forward hook state: composes each reorganization with the ones before it."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []
        self.pending: tuple | None = None

    def publish(self, published: nn.Module, args: tuple, output: None) -> None:
        """Hook on ``reorganizer.published``: what the reorganizer decided, during its forward."""
        self.pending = args

    def __call__(self, module: TokenReorganizer, args: tuple, kwargs: dict, output) -> None:
        """Hook on the reorganizer: one stage per call; an identity stage where nothing moved."""
        pending, self.pending = self.pending, None
        if pending is None:
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            scores = module.scores(bound["attn_a"], bound.get("attn_b"), bound.get("bias"))
            batch, num_image = scores.shape
            pending = (Mix(torch.arange(num_image, device=scores.device).expand(batch, -1)), scores, None)
        mix, scores, _ = pending
        batch, num_image = scores.shape
        entering = self._entering(module, batch, num_image, scores.device)
        kept = mix.kept
        fused = mix.rest is not None
        mix_weights, member = mixing(mix, num_image)
        members = (member.to(torch.float64) @ entering[1].to(torch.float64)) > 0
        weights = mix_weights @ entering[3]
        grew = member[:, : kept.shape[1]].sum(-1) > 1  # took in moved tokens
        is_fused = entering[2].gather(1, kept) | grew
        origin = torch.where(is_fused, -1, entering[0].gather(1, kept))
        if fused:
            origin = torch.cat([origin, origin.new_full((batch, 1), -1)], 1)
            is_fused = torch.cat([is_fused, is_fused.new_ones(batch, 1)], 1)
            grew = torch.cat([grew, grew.new_ones(batch, 1)], 1)
        stage = Stage(module.layer, module.keep, scores, kept, fused, origin, members, is_fused, weights, grew)
        self.stages.append(stage)

    def _entering(self, module: TokenReorganizer, batch: int, num_image: int, device) -> tuple[Tensor, ...]:
        """``(origin, members, is_fused, weights)`` of the tokens entering ``module``."""
        if not self.stages:  # the first reorganizer sees the patches in raster order
            eye = torch.eye(num_image, device=device, dtype=torch.float64).expand(batch, -1, -1)
            origin = torch.arange(num_image, device=device).expand(batch, -1)
            return origin, eye > 0, torch.zeros(batch, num_image, dtype=torch.bool, device=device), eye
        last = self.stages[-1]
        if last.origin.shape != (batch, num_image):
            raise UnsupportedInputError(
                f"track_tokens: block {module.layer} received {num_image} image tokens for a batch of {batch}, "
                f"but block {last.layer} produced {last.origin.shape[1]} for a batch of {last.origin.shape[0]}: "
                "expected every reorganizer to run once per forward, in layer order"
            )
        return last.origin, last.members, last.is_fused, last.weights


def patch_grid(model: nn.Module, image_size: Sequence[int], num_patches: int) -> tuple[int, int]:
    """``(rows, columns)`` of patches for an image of ``image_size`` (height, width), as the model's
    family lays them out."""
    try:
        grid = find_family(model).patch_grid(model, tuple(int(s) for s in image_size))
    except EViTError as exc:
        grid, reason = None, f" ({exc})"
    else:
        reason = ""
    if grid is None or len(grid) != 2 or grid[0] * grid[1] != num_patches:
        raise UnsupportedInputError(
            f"track_tokens: cannot lay out the {num_patches} image tokens of {describe(model)} on a patch grid "
            f"for a {tuple(image_size)} image (patch grid: {grid}){reason}; expected a 2-D patch embedding"
        )
    return grid


def track_tokens(model: nn.Module, x: Tensor) -> TokenTrace:
    """Run a patched model on ``x`` and record which original patches every token stands for.

    The model is not modified: forward hooks on its reorganizers are added for this one call and
    removed after. Runs without gradients; the model's train/eval mode is left as it is.

    Args:
        model: a model returned by :func:`evit_patch.apply`.
        x: ``(B, C, H, W)`` images, normalised as the model expects.
    """
    modules = _require_patched(model, "track_tokens")
    recorder = _Recorder()
    handles = [m.register_forward_hook(recorder, with_kwargs=True) for m in modules]
    handles += [m.published.register_forward_hook(recorder.publish) for m in modules]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    if len(recorder.stages) != len(modules):
        raise UnsupportedInputError(
            f"track_tokens: {describe(model)} ran {len(recorder.stages)} of its {len(modules)} reorganizers "
            "in one forward; expected each exactly once"
        )
    grid = patch_grid(model, x.shape[-2:], recorder.stages[0].scores.shape[1])
    return TokenTrace(logits, grid, modules[0].num_prefix_tokens, tuple(recorder.stages))
