"""timm methods that a patched model's traced blocks cannot serve as the class wrote them.

A patched model gets instance attributes that shadow the class's methods (the class itself is
never changed): ``forward_intermediates`` (and ``get_intermediate_layers``, which calls it) serves
what is sound, block outputs before the first reorganization and the final features, and refuses
the rest with the reason (timm's reshape to ``(B, C, H, W)`` would fail with a bare ``shape '[...]'
is invalid``); ``set_input_size`` is tried on a copy first, and refused by name where the traced
blocks cannot follow (BEiT's relative position tables are baked into its traced blocks). With an
attention-pool head, whose final norm passes the token state on to the head, ``forward_features``
returns the features without it, and ``forward`` hands the head the features with it.
"""

from __future__ import annotations

import copy
import functools

import torch.fx as fx
from torch import nn

from ..errors import UnsupportedInputError
from ..token_state import strip
from .base import describe


class GuardedIntermediates:
    """``model.forward_intermediates`` of a patched timm model (picklable; copies follow the model)."""

    def __init__(self, model: nn.Module, first: int) -> None:
        self.model, self.first = model, int(first)
        """``first``: the first reorganizing block."""

    def __call__(self, x, indices=None, *args, **kwargs):
        from timm.models._features import feature_take_indices

        model, first = self.model, self.first
        take, _ = feature_take_indices(len(model.blocks), indices)
        late = sorted(int(i) for i in take if i >= first)
        if late:
            raise UnsupportedInputError(
                f"forward_intermediates: {describe(model)} reorganizes tokens from block {first} on, so the "
                f"outputs of blocks {late} hold fewer tokens and no spatial grid; take blocks before {first} "
                "(the final features are returned as usual), or call the original model"
            )
        if kwargs.get("norm") and isinstance(getattr(model, "norm", None), fx.GraphModule):
            raise UnsupportedInputError(
                f"forward_intermediates: {describe(model)}'s final norm carries EViT's token-size weights "
                "(average pool); call with norm=False"
            )
        return type(model).forward_intermediates(model, x, indices, *args, **kwargs)


class GuardedSetInputSize:
    """``model.set_input_size`` of a patched timm model: all or nothing, with the reason when nothing."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, **kwargs) -> None:
        model = self.model
        trial = copy.deepcopy(model)
        try:
            type(model).set_input_size(trial, *args, **kwargs)
        except AttributeError as exc:
            raise UnsupportedInputError(
                f"set_input_size: {describe(model)} was patched with blocks traced for its input size, which "
                f"cannot follow a new one ({exc}); call set_input_size on the original model and apply "
                "evit_patch again, or use evit_patch.apply(model, ..., img_size=...)"
            ) from exc
        type(model).set_input_size(model, *args, **kwargs)


def install_guards(model: nn.Module, first: int) -> None:
    """Shadow ``forward_intermediates`` and ``set_input_size`` on a patched model whose class has them
    (``first``: its first reorganizing block)."""
    if callable(getattr(type(model), "forward_intermediates", None)) and hasattr(model, "blocks"):
        model.forward_intermediates = GuardedIntermediates(model, first)
    if callable(getattr(type(model), "set_input_size", None)):
        model.set_input_size = GuardedSetInputSize(model)


def _stripped_features(model: nn.Module, channels: int, x, *args, **kwargs):
    """``model.forward_features``: the class's features at the library's width."""
    return strip(type(model).forward_features(model, x, *args, **kwargs), channels)


def _guarded_head(model: nn.Module, channels: int, full: int, x, *args, **kwargs):
    """``model.forward_head``: refuses reduced features that lost the sizes its pool weighs tokens by."""
    if x.shape[-1] == channels and x.shape[1] < full:
        raise UnsupportedInputError(
            f"forward_head: {describe(model)} got {x.shape[1]} reduced tokens without their sizes (the unreduced "
            f"model gives it {full}); forward_features returns them stripped of the sizes its attention pool "
            "weighs tokens by: call the model itself (after reset_classifier(0) for the pooled embedding)"
        )
    return type(model).forward_head(model, x, *args, **kwargs)


def _stateful_forward(model: nn.Module, x, *args, **kwargs):
    """``model.forward``: the class's features, state included, into the head."""
    return model.forward_head(type(model).forward_features(model, x, *args, **kwargs))


def confine_state(model: nn.Module, channels: int, full: int) -> None:
    """Shadow ``forward_features`` (stripped), ``forward_head`` (refuses stripped reduced features) and
    ``forward`` (features with their state into the head) on a patched model whose final norm passes
    the token state on to an attention pool. Partials of module functions: picklable, copied with
    the model, and ``torch.export`` reads a partial ``forward``."""
    model.forward_features = functools.partial(_stripped_features, model, channels)
    model.forward_head = functools.partial(_guarded_head, model, channels, full)
    model.forward = functools.partial(_stateful_forward, model)
