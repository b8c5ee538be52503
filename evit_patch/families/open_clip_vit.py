"""open_clip's ``VisionTransformer``: the ``.visual`` tower of ``open_clip.create_model('ViT-B-32')`` etc.

Its blocks (``ResidualAttentionBlock``) call ``nn.MultiheadAttention``, re-expressed with SDPA on
the same parameters as for torchvision (:mod:`evit_patch.families.mha`). The tower always has a
class token; it is pooled by that token (``pool_type='tok'``) or by an average over the image
tokens (``'avg'``, which weighs a fused token by the tokens it stands for), after ``ln_post``, the
per-token norm where the token state is split off (with ``final_ln_after_pool``, ``ln_post`` follows
a class-token pool instead, and the last block returns the bare tokens). With ``attentional_pool=True``
(CoCa's tower) an ``AttentionalPooler`` reads the last block's output, class token included, through
its own key norm and one ``nn.MultiheadAttention``: the last block passes the token state on and the
pooler adds ``log(size)`` to each key's logit (its float ``attn_mask``), so a fused or merged token
weighs as the tokens it stands for; ``ln_post``, the pool over its fixed set of queries and ``proj``
follow unchanged. open_clip is imported nowhere: matching is by class path. Towers built on timm
(``TimmModel``: SigLIP, ...) hold a timm ViT at ``.trunk``, which the timm families serve.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import nn

from ..errors import UnsupportedInputError, UnsupportedModelError
from ..options import Pool
from .base import Family, attention_pool_macs, class_path, describe
from .intermediates import refuse_late, restored
from .mha import check_multihead_attention, with_sdpa_attention
from .registry import register_family

_MODULE = "open_clip.transformer"
_CLASS = f"{_MODULE}.VisionTransformer"
_BLOCK = f"{_MODULE}.ResidualAttentionBlock"
_POOLER = f"{_MODULE}.AttentionalPooler"


class OpenClipIntermediates:
    """``model.forward_intermediates`` of a patched open_clip tower (picklable; copies follow the model):
    block outputs restored to the full grid when patched ``dense`` (``(channels, patches)``), else
    blocks from the first reorganizing one on refused; the pooled ``image_features`` are the class's."""

    def __init__(self, model: nn.Module, first: int, dense: tuple[int, int] | None) -> None:
        self.model, self.first, self.dense = model, int(first), dense

    def __call__(
        self,
        x,
        indices=None,
        stop_early: bool = False,
        normalize_intermediates: bool = False,
        intermediates_only: bool = False,
        output_fmt: str = "NCHW",
        output_extra_tokens: bool = False,
    ):
        model = self.model
        if self.dense is None:
            depth = len(model.transformer.resblocks)
            taken = (
                range(depth)[-indices:] if isinstance(indices, int) else (range(depth) if indices is None else indices)
            )
            refuse_late(model, self.first, [i % depth for i in taken])
            return type(model).forward_intermediates(
                model,
                x,
                indices,
                stop_early,
                normalize_intermediates,
                intermediates_only,
                output_fmt,
                output_extra_tokens,
            )
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        out = type(model).forward_intermediates(
            model, x, indices, stop_early, False, intermediates_only, "NLC", output_extra_tokens=True
        )
        channels, patches = self.dense
        pairs = zip(out["image_intermediates"], out["image_intermediates_prefix"])
        grid = (
            (x.shape[-2] // model.patch_size[0], x.shape[-1] // model.patch_size[1]) if output_fmt == "NCHW" else None
        )
        norm = model.ln_post if normalize_intermediates else None
        grids, prefixes = restored(pairs, channels=channels, prefix=1, patches=patches, norm=norm, grid=grid)
        out["image_intermediates"] = grids
        if output_extra_tokens:
            out["image_intermediates_prefix"] = prefixes
        else:
            del out["image_intermediates_prefix"]
        return out


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


_POOL_ATTRIBUTES = ("pool_type", "final_ln_after_pool", "output_tokens")
"""What a token-pooled tower's output depends on, read by ``forward`` at every call."""


def refuse_at_call(model: nn.Module, args: tuple, *, patched: dict) -> None:
    """Forward pre-hook on a patched token-pooled tower: a pooling attribute set after patching is
    refused at call time (``forward`` reads them then), never served wrong. ``output_tokens=True``
    would return the surviving tokens (fewer than the grid, merged ones weighing one) as if they
    were every patch's; another ``pool_type`` or ``final_ln_after_pool`` would pool tokens that
    were wired for ``patched``'s pool."""
    changed = [f"{name}={getattr(model, name)!r}" for name, was in patched.items() if getattr(model, name) != was]
    if changed:
        shown = ", ".join(f"{name}={was!r}" for name, was in patched.items())
        raise UnsupportedInputError(
            f"{describe(model)} was patched by evit_patch with {shown}: {', '.join(changed)} cannot be honoured "
            "(the patched blocks return fewer, reorganized tokens); set it back, or patch a tower configured so"
        )


@register_family
class OpenClipVisionTransformer(Family):
    name = "open_clip.VisionTransformer"
    notes = (
        "the .visual tower of open_clip's ViT-* CLIP models: nn.MultiheadAttention re-expressed with SDPA on "
        "the same parameters (keep=1.0 matches to float rounding, not bitwise); class-token or average "
        "pooling, or attentional pooling (attentional_pool=True, CoCa), where a fused or merged token weighs as "
        "the tokens it stands for in the pooler's softmax; fixed input size. Not yet: the two-pooler "
        "attentional_pool='parallel'/'cascade', average pooling with final_ln_after_pool (CLIPA), "
        "output_tokens without an attentional pooler. timm-based towers (SigLIP): patch model.visual.trunk"
    )

    classes = frozenset({_CLASS})

    def check(self, model: nn.Module) -> None:
        who = describe(model)
        if model.attn_pool is not None:
            self._check_attentional_pooler(model, who)
        else:
            self._check_token_pool(model, who)
        if not isinstance(model.patch_dropout, nn.Identity):
            raise UnsupportedModelError(
                f"{who} drops patches at random in training (patch_dropout > 0); expected none: both would "
                "select tokens"
            )
        for name, block in self.blocks(model):
            where = f"{who}.{name}"
            if _BLOCK not in class_path(block) or hasattr(block, "ln_1_kv"):
                raise UnsupportedModelError(
                    f"{where}: expected a self-attention ResidualAttentionBlock, found {type(block).__name__} "
                    "(custom blocks: qk_norm, scaled cosine attention, ...)"
                )
            check_multihead_attention(block.attn, f"{where}.attn")

    def _check_attentional_pooler(self, model: nn.Module, who: str) -> None:
        """``attentional_pool=True``: one pooler reads the tokens; what follows it (``ln_post``, the
        pool over its queries, ``output_tokens``) sees a fixed number of query outputs."""
        if getattr(model, "attn_pool_contrastive", None) is not None:
            raise UnsupportedModelError(
                f"{who} has attentional_pool={model.attn_pool_type!r}: ln_post normalises every token before "
                "two attentional poolers (open_clip's untested two-pooler variant); expected attentional_pool=True"
            )
        if _POOLER not in class_path(model.attn_pool):
            raise UnsupportedModelError(
                f"{who}.attn_pool: expected open_clip's AttentionalPooler, found {type(model.attn_pool).__name__}"
            )

    def _check_token_pool(self, model: nn.Module, who: str) -> None:
        if model.pool_type not in ("tok", "avg"):
            raise UnsupportedModelError(
                f"{who} has pool_type={model.pool_type!r}: its output is every token, which EViT drops and "
                "fuses; expected pool_type='tok' or 'avg'"
            )
        if model.final_ln_after_pool and model.pool_type == "avg":
            raise UnsupportedModelError(
                f"{who} has final_ln_after_pool=True and pool_type='avg' (CLIPA): it averages the last block's "
                "output directly, with no per-token norm in between where the fused tokens' sizes could weigh "
                "the mean; expected final_ln_after_pool=False or pool_type='tok'"
            )
        if model.output_tokens:
            raise UnsupportedModelError(
                f"{who} has output_tokens=True: it returns every image token, which EViT drops and fuses; "
                "expected output_tokens=False"
            )

    def pool(self, model: nn.Module) -> Pool:
        if model.attn_pool is not None:
            return Pool.ATTENTION
        return Pool.AVG if model.pool_type == "avg" else Pool.TOKEN

    def pool_module(self, model: nn.Module) -> str:
        return "attn_pool"

    def pool_prefix_tokens(self, model: nn.Module) -> int:
        return 1  # the pooler reads the class token too

    def pool_macs_per_token(self, model: nn.Module) -> int:
        return 0 if model.attn_pool is None else attention_pool_macs(model.attn_pool, self.channels(model))[1]

    def blocks(self, model: nn.Module) -> Sequence[tuple[str, nn.Module]]:
        blocks = model.transformer.resblocks.named_children()
        return [(f"transformer.resblocks.{name}", block) for name, block in blocks]

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1  # the class embedding is always prepended

    def channels(self, model: nn.Module) -> int:
        return int(model.transformer.width)

    def final_norm(self, model: nn.Module) -> str | None:
        # final_ln_after_pool: ln_post normalises the pooled class token only; nothing per token follows.
        # An attentional pooler reads the last block's output (its ln_k normalises the keys) and
        # splits the token state off itself; ln_post then normalises its queries' outputs.
        return None if model.final_ln_after_pool or model.attn_pool is not None else "ln_post"

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        return _pair(model.image_size)

    def in_chans(self, model: nn.Module) -> int:
        return int(model.conv1.in_channels)

    def _check_size(self, model: nn.Module, img_size) -> None:
        own = _pair(model.image_size)
        if img_size is not None and _pair(img_size) != own:
            raise UnsupportedModelError(
                f"{describe(model)} only accepts {own[0]}x{own[1]} images (its position embedding has a "
                f"fixed size); got img_size={img_size!r}"
            )

    def patch_grid(self, model: nn.Module, img_size=None) -> tuple[int, int]:
        self._check_size(model, img_size)
        return _pair(model.grid_size)

    def num_tokens(self, model: nn.Module, img_size=None) -> int:
        rows, cols = self.patch_grid(model, img_size)
        return rows * cols + 1

    def outside_macs(self, model: nn.Module, img_size=None) -> int:
        """The patch convolution (one weight per patch, no bias), the attentional pooler's part that does
        not scale with the tokens (its queries' projections), and the projection of the pooled token
        (of every query's output with ``pool_type='none'``)."""
        rows, cols = self.patch_grid(model, img_size)
        pooled = model.attn_pool.query.shape[0] if model.attn_pool is not None and model.pool_type == "none" else 1
        head = 0 if model.proj is None else model.proj.numel() * pooled
        if model.attn_pool is not None:
            head += attention_pool_macs(model.attn_pool, self.channels(model))[0]
        return model.conv1.weight.numel() * rows * cols + head

    def resized(self, model: nn.Module, img_size) -> nn.Module:
        self._check_size(model, img_size)
        return model

    def prepare_block(self, block: nn.Module) -> nn.Module:
        return with_sdpa_attention(block, "attn")

    def install_guards(self, model: nn.Module, first: int, dense: bool = False) -> None:
        """A token-pooled tower refuses, at call time, pooling attributes changed after patching
        (:func:`refuse_at_call`); an attentional pooler's outputs are its queries', whatever they are.
        ``forward_intermediates`` serves restored grids (``dense``) or refuses late blocks."""
        if callable(getattr(type(model), "forward_intermediates", None)):
            prefix = self.num_prefix_tokens(model)
            layout = (self.channels(model), self.num_tokens(model) - prefix) if dense else None
            model.forward_intermediates = OpenClipIntermediates(model, first, layout)
        if model.attn_pool is None:
            patched = {name: getattr(model, name) for name in _POOL_ATTRIBUTES}
            model.register_forward_pre_hook(functools.partial(refuse_at_call, patched=patched))
