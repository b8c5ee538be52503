"""``apply``: the one verb. Copy, trace, locate, rewrite; the caller's model is never touched."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn

from .budget import default_layers, plan
from .checks import check_not_patched
from .config import EViTConfig
from .errors import InvalidPlanError
from .families import describe, find_family
from .guards import install_guards
from .profile import PROFILE_ATTR, TracedBlock, profile_of, trace_blocks
from .reorganizer import Score, TokenReorganizer
from .rewrite import insert_position_gathers, insert_reorganizer, with_size_weights
from .token_track import TokenTrack

DEFAULT_KEEP = 0.7


def apply(
    model: nn.Module,
    layers: int | Iterable[int] | None = None,
    keep: float | Iterable[float] | None = None,
    *,
    fuse: bool = True,
    flops: float | None = None,
    speedup: float | None = None,
    img_size: int | tuple[int, int] | None = None,
    score: str | None = None,
) -> nn.Module:
    """Return an EViT copy of ``model`` that reorganizes tokens after attention at ``layers``.

    The copy is the same class as ``model`` with the chosen blocks replaced by traced graphs
    that hold a :class:`TokenReorganizer`; parameters, ``state_dict`` keys and attributes
    (``pretrained_cfg``, ``num_classes``, ...) are unchanged. Blocks are traced in eval mode: an
    attention dropout inside fused SDPA is fixed to off (pretrained ViTs have none); dropout and
    drop-path modules keep following ``.train()``/``.eval()``.

    Args:
        model: a supported vision transformer (see :func:`list_supported`).
        layers: 0-indexed blocks that reorganize; default D/4, D/2, 3D/4 (3, 6, 9 of 12).
        keep: fraction of image tokens kept at each layer, one rate or one per layer, in (0, 1];
            default 0.7 unless a budget is given.
        fuse: fuse the dropped tokens into one extra token (EViT's inattentive fusion).
        flops: instead of ``keep``, a MAC budget as a fraction of the original (see :func:`plan`).
        speedup: instead of ``keep``, a FLOP-ideal speedup budget.
        img_size: patch a copy resized to this input size (timm's position-embedding
            interpolation); with ``flops=1.0`` it runs at the original's cost.
        score: what ranks the image tokens: ``"cls"``, the [CLS] token's attention (EViT), or
            ``"received"``, the attention each token receives from every query (the only choice
            without a class token; it costs one ``N x N`` map at each reorganizing block). ``None``:
            ``"cls"`` where the model has a class token. See docs/how-it-works.md for measurements.

    Raises:
        UnsupportedModelError: the model or a block cannot be patched soundly (nothing changed).
        InvalidPlanError: ``layers``/``keep`` are malformed for this model, or the budget is infeasible.
    """
    check_not_patched(model)
    family = find_family(model)
    family.check(model)
    if flops is not None or speedup is not None:
        if keep is not None:
            raise InvalidPlanError(f"{describe(model)}: give keep or a budget (flops/speedup), not both")
        config = plan(model, flops=flops, speedup=speedup, layers=layers, img_size=img_size, fuse=fuse, score=score)
    else:
        num_blocks = len(family.blocks(model))
        layers = default_layers(num_blocks) if layers is None else layers
        keep = DEFAULT_KEEP if keep is None else keep
        config = EViTConfig.build(layers, keep, fuse, num_blocks=num_blocks, where=describe(model), score=score)
    ranking = _score(model, family, config.score)
    source = model if img_size is None else family.resized(model, img_size)
    patched = copy.deepcopy(source) if source is model else source
    traced = trace_blocks(patched, family)
    track = _track(patched, family, traced)
    rates = dict(zip(config.layers, config.keep))
    rotary, averaged = family.rotary_args(patched), family.pool(patched) == "avg"
    for index, block in enumerate(traced):
        bias = block.site.bias
        if track is not None:
            bias = insert_position_gathers(block.graph_module, block.site, track, rotary, first=index == 0)
        if index in rates:
            reorganizer = TokenReorganizer(
                rates[index],
                num_prefix_tokens=family.num_prefix_tokens(patched),
                source=block.site.source,
                fuse=config.fuse,
                scale=block.site.scale,
                layer=index,
                score=ranking,
                track=track,
                fuse_mean=averaged,
            )
            insert_reorganizer(block.graph_module, block.site, reorganizer, bias)
        if index in rates or track is not None:
            patched.set_submodule(block.name, block.graph_module)
    if track is not None:
        name = family.final_norm(patched)
        norm = with_size_weights(patched.get_submodule(name), track, averaged, where=f"{describe(patched)}.{name}")
        patched.set_submodule(name, norm)
    setattr(patched, PROFILE_ATTR, profile_of(traced, patched, family))
    install_guards(patched)
    return patched


def _score(model: nn.Module, family, requested: str | None) -> Score:
    default = family.score(model)
    if requested is None:
        return default
    if requested == Score.CLS.value and default is Score.RECEIVED:
        raise InvalidPlanError(
            f"{describe(model)} has no class token: score='cls' needs one; use score='received' (the default here)"
        )
    return Score(requested)


def _track(model: nn.Module, family, traced: list[TracedBlock]) -> TokenTrack | None:
    """A :class:`TokenTrack` when some op after a reorganization depends on token positions or counts."""
    positional = family.rotary_args(model) or any(t.site.bias is not None for t in traced)
    if not positional and family.pool(model) != "avg":
        return None
    prefix = family.num_prefix_tokens(model)
    return TokenTrack(prefix, family.num_tokens(model) - prefix)
