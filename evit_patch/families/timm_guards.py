"""timm methods that a patched model's traced blocks cannot serve as the class wrote them.

A patched model gets instance attributes that shadow the class's methods (the class itself is
never changed): ``forward_intermediates`` (and ``get_intermediate_layers``, which calls it) serves
every block's output restored to the full patch grid when the model was patched with ``dense=True``
(:func:`~evit_patch.token_state.restore`); otherwise what is sound, block outputs before the first
reorganization and the final features, and refuses the rest with the reason (timm's reshape to
``(B, C, H, W)`` would fail with a bare ``shape '[...]' is invalid``). ``set_input_size`` is tried
on a copy first, and refused by name where the traced blocks cannot follow (BEiT's relative
position tables are baked into its traced blocks). With an attention-pool head, whose final norm
passes the token state on to the head, ``forward_features`` returns the features without it, and
``forward`` hands the head the features with it.
"""

from __future__ import annotations

import copy
import functools

import torch.fx as fx
from torch import nn

from ..errors import UnsupportedInputError
from ..token_state import strip
from .base import describe
from .intermediates import refuse_late, restored

_TIMM_DEFAULTS = {"return_prefix_tokens": False, "norm": False, "stop_early": False, "output_fmt": "NCHW"}
_TIMM_DEFAULTS |= {"intermediates_only": False, "output_dict": False}
"""``forward_intermediates``' own options after ``x`` and ``indices``, with timm's defaults."""


class GuardedIntermediates:
    """``model.forward_intermediates`` of a patched timm model (picklable; copies follow the model).

    ``dense``: ``(channels, patches)`` of a model patched with ``dense=True``, whose block outputs
    are served restored to the full grid; ``None``: late blocks are refused."""

    def __init__(self, model: nn.Module, first: int, dense: tuple[int, int] | None = None) -> None:
        self.model, self.first = model, int(first)
        """``first``: the first reorganizing block."""
        self.dense = dense

    def __call__(self, x, indices=None, *args, **kwargs):
        if self.dense is not None:
            return self._dense(x, indices, *args, **kwargs)
        from timm.models._features import feature_take_indices

        model = self.model
        refuse_late(model, self.first, feature_take_indices(len(model.blocks), indices)[0])
        if kwargs.get("norm") and isinstance(getattr(model, "norm", None), fx.GraphModule):
            raise UnsupportedInputError(
                f"forward_intermediates: {describe(model)}'s final norm carries EViT's token-size weights "
                "(average pool); call with norm=False"
            )
        return type(model).forward_intermediates(model, x, indices, *args, **kwargs)

    def _dense(self, x, indices=None, *args, **kwargs):
        """timm's ``forward_intermediates`` with each taken block output restored to the full grid
        (then normed, split and reshaped as timm does); the final features are the reduced tokens."""
        model, (channels, patches) = self.model, self.dense
        names = list(_TIMM_DEFAULTS)
        if len(args) > len(names):
            raise TypeError(f"forward_intermediates: too many positional arguments ({len(args) + 2})")
        unknown = sorted(set(kwargs) - set(names) - {"attn_mask", "is_causal"})
        if unknown:
            raise TypeError(f"forward_intermediates: unexpected keyword arguments {unknown}")
        options = _TIMM_DEFAULTS | dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise UnsupportedInputError(
                f"forward_intermediates: {describe(model)} reorganizes tokens, so an attention mask built for every "
                "token cannot be honoured; call without attn_mask/is_causal"
            )
        if options["output_fmt"] not in ("NCHW", "NLC"):
            raise ValueError(
                f"forward_intermediates: output_fmt must be 'NCHW' or 'NLC', got {options['output_fmt']!r}"
            )
        prefix = int(model.num_prefix_tokens)
        result = type(model).forward_intermediates(
            model,
            x,
            indices,
            return_prefix_tokens=bool(prefix),  # timm's relative-position ViT fails on True without prefix tokens
            norm=False,
            stop_early=options["stop_early"],
            output_fmt="NLC",
            intermediates_only=options["intermediates_only"],
        )
        taken = result if options["intermediates_only"] else result[1]
        grid = model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])) if options["output_fmt"] == "NCHW" else None
        norm = model.norm if options["norm"] else None
        grids, prefixes = restored(taken, channels=channels, prefix=prefix, patches=patches, norm=norm, grid=grid)
        final = None if options["intermediates_only"] else strip(result[0], channels)
        if options["output_dict"]:
            out = {"image_intermediates": grids}
            if prefix and options["return_prefix_tokens"]:
                out["image_intermediates_prefix"] = prefixes
            return out if final is None else out | {"image_features": final}
        if prefix and options["return_prefix_tokens"]:
            grids = list(zip(grids, prefixes))
        return grids if final is None else (final, grids)


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


def install_guards(model: nn.Module, first: int, dense: tuple[int, int] | None = None) -> None:
    """Shadow ``forward_intermediates`` and ``set_input_size`` on a patched model whose class has them
    (``first``: its first reorganizing block; ``dense``: its ``(channels, patches)`` if patched dense)."""
    if callable(getattr(type(model), "forward_intermediates", None)) and hasattr(model, "blocks"):
        model.forward_intermediates = GuardedIntermediates(model, first, dense)
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
