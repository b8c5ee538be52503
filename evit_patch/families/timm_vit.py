"""timm's ``VisionTransformer`` and subclasses (ViT, DeiT, DeiT III, distilled DeiT, registers, CLIP)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import timm
import torch
from timm.layers import AttentionPoolLatent, DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import CheckpointError, UnsupportedModelError
from ..options import Pool, Score
from .base import Family, Recipe, attention_pool_macs, describe, foreign_override
from .registry import register_family
from .timm_guards import confine_state, install_guards

OWN = ("forward", "forward_features", "forward_head", "pool", "_pos_embed")
"""timm's methods the family's answers rely on."""


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _patches(embed: nn.Module, size: tuple[int, int]) -> int:
    grid = embed.dynamic_feat_size(size)
    return int(grid[0] * grid[1])


def check_pool(model: nn.Module, who: str, attention: bool = False) -> None:
    """Token pooling, an average over the image tokens (size-weighted once tokens are fused), or
    (``attention``: the families whose code is known to allow it) timm's attention-pool head."""
    if getattr(model, "attn_pool", None) is not None:
        if attention:
            return check_attention_pool(model, who)
        raise UnsupportedModelError(
            f"{who} pools with an attention-pool head (global_pool={model.global_pool!r}); "
            "expected global_pool='token' or 'avg'"
        )
    if model.global_pool not in ("token", "avg"):
        raise UnsupportedModelError(
            f"{who} has global_pool={model.global_pool!r}: its output reads every image token "
            "one by one, which EViT drops and fuses; expected global_pool='token' or 'avg'"
        )
    if model.global_pool == "avg" and getattr(model, "pool_include_prefix", False):
        raise UnsupportedModelError(
            f"{who} averages prefix and image tokens together (pool_include_prefix=True); expected "
            "an average over the image tokens only"
        )
    if getattr(model, "cls_token", None) is None and model.global_pool != "avg":
        raise UnsupportedModelError(
            f"{who} has no class token and global_pool={model.global_pool!r}; expected a class token "
            "or global_pool='avg'"
        )


def check_attention_pool(model: nn.Module, who: str) -> None:
    """``global_pool='map'``: ``AttentionPoolLatent`` without a per-position embedding of its own
    (which would have to follow the tokens' positions, and has none for a fused token)."""
    pool = model.attn_pool
    if not isinstance(pool, AttentionPoolLatent) or pool.pos_embed is not None:
        found = type(pool).__name__ + (" with pos_embed='abs'" if getattr(pool, "pos_embed", None) is not None else "")
        raise UnsupportedModelError(
            f"{who}.attn_pool: expected timm's AttentionPoolLatent without a position embedding "
            f"(global_pool='map'), found {found}"
        )


def score_of(model: nn.Module) -> Score:
    """[CLS] attention where there is a class token, else the attention each token receives."""
    return Score.CLS if getattr(model, "cls_token", None) is not None else Score.RECEIVED


def pool_of(model: nn.Module) -> Pool:
    if getattr(model, "attn_pool", None) is not None:
        return Pool.ATTENTION
    return Pool.AVG if model.global_pool == "avg" else Pool.TOKEN


@register_family
class TimmVisionTransformer(Family):
    name = "timm.VisionTransformer"
    notes = (
        "vit_*, deit_*, deit3_*, distilled DeiT, register-token and CLIP-style ViTs; token-pooled, or "
        "average-pooled (*_gap_*) with or without a class token: without one, tokens are ranked by the "
        "attention they receive, and the fused token counts as the tokens it stands for in the average; "
        "attention-pooled (global_pool='map': SigLIP, so400m), where a fused or merged token weighs as the "
        "tokens it stands for in the probe's softmax (log(size) added to its logits)"
    )

    classes = frozenset({"timm.models.vision_transformer.VisionTransformer"})

    def matches(self, model: nn.Module) -> bool:
        """timm's classes and subclasses that keep timm's forward: a subclass from elsewhere with a
        forward of its own (MAE's ``models_vit``, which pools by ``global_pool=True/False``) reads its
        tokens its own way, so structural discovery reads it instead."""
        return isinstance(model, VisionTransformer) and foreign_override(model, VisionTransformer, OWN, "timm.") is None

    def check(self, model: nn.Module) -> None:
        check_pool(model, describe(model), attention=True)

    def score(self, model: nn.Module) -> Score:
        return score_of(model)

    def pool(self, model: nn.Module) -> Pool:
        return pool_of(model)

    def pool_module(self, model: nn.Module) -> str:
        return "attn_pool"

    def pool_prefix_tokens(self, model: nn.Module) -> int:
        """``VisionTransformer.pool`` slices the prefix tokens off unless ``pool_include_prefix``."""
        return int(model.num_prefix_tokens) if getattr(model, "pool_include_prefix", False) else 0

    def pool_macs_per_token(self, model: nn.Module) -> int:
        pool = getattr(model, "attn_pool", None)
        return 0 if pool is None else attention_pool_macs(pool, int(model.embed_dim))[1]

    def blocks(self, model: nn.Module) -> Sequence[tuple[str, nn.Module]]:
        return [(f"blocks.{name}", block) for name, block in model.blocks.named_children()]

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def channels(self, model: nn.Module) -> int:
        return int(model.embed_dim)

    def _img_size(self, model: nn.Module, img_size) -> tuple[int, int]:
        return _pair(img_size) if img_size is not None else _pair(model.patch_embed.img_size)

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        return _pair(model.patch_embed.img_size)

    def in_chans(self, model: nn.Module) -> int:
        return int(model.patch_embed.proj.in_channels)

    def patch_grid(self, model: nn.Module, img_size=None) -> tuple[int, int]:
        embed = model.patch_embed
        grid = embed.grid_size if img_size is None else embed.dynamic_feat_size(_pair(img_size))
        return int(grid[0]), int(grid[1])

    def num_tokens(self, model: nn.Module, img_size=None) -> int:
        embed = model.patch_embed
        if img_size is None:
            grid = embed.grid_size
        else:
            grid = embed.dynamic_feat_size(self._img_size(model, img_size))
        return int(grid[0] * grid[1]) + self.num_prefix_tokens(model)

    def outside_macs(self, model: nn.Module, img_size=None) -> int:
        # Count the embedding by running it once (it may be a conv stem or a hybrid CNN), at the
        # model's own size when it only accepts that one (its cost scales with the patch count),
        # and the head analytically: it reads one token per classifier.
        embed = model.patch_embed
        size = self._img_size(model, img_size)
        fixed = getattr(embed, "strict_img_size", False) and not getattr(embed, "dynamic_img_pad", False)
        run_size = self._img_size(model, None) if fixed else size
        param = next(embed.parameters())
        channels = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3,))[0]
        image = torch.zeros(1, channels, *run_size, device=param.device, dtype=param.dtype)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            embed(image)
        embed_macs = counter.get_total_flops() // 2
        if run_size != size:
            embed_macs = embed_macs * _patches(embed, size) // _patches(embed, run_size)
        heads = model.get_classifier()
        heads = heads if isinstance(heads, tuple) else (heads,)
        head_macs = sum(m.in_features * m.out_features for h in heads for m in h.modules() if isinstance(m, nn.Linear))
        if getattr(model, "attn_pool", None) is not None:  # its per-token part: pool_macs_per_token
            head_macs += attention_pool_macs(model.attn_pool, int(model.embed_dim))[0]
        return embed_macs + head_macs

    def resized(self, model: nn.Module, img_size) -> nn.Module:
        """A copy at ``img_size``, position embeddings resampled by timm's own interpolation."""
        if self._img_size(model, img_size) == self._img_size(model, None):
            return model
        resized = copy.deepcopy(model)
        resized.set_input_size(img_size=self._img_size(model, img_size))
        return resized

    def leaf_types(self) -> tuple[type[nn.Module], ...]:
        return (DropPath,)

    def recipe(self, model: nn.Module, architecture: str | None = None, model_kwargs: dict | None = None) -> Recipe:
        """timm's model name (``pretrained_cfg["architecture"]``) and the constructor arguments that
        fine-tuning or resizing commonly changes from its defaults, under the caller's overrides."""
        cfg = getattr(model, "pretrained_cfg", None) or {}
        architecture = architecture or (cfg.get("architecture") if isinstance(cfg, dict) else None)
        if not architecture:
            raise CheckpointError(
                f"save_pretrained: {describe(model)} has no pretrained_cfg['architecture']; "
                "pass architecture='<timm model name>' so the model can be rebuilt"
            )
        kwargs: dict = {"img_size": list(self.input_size(model))}
        if isinstance(getattr(model, "num_classes", None), int):
            kwargs["num_classes"] = model.num_classes
        if isinstance(getattr(model, "global_pool", None), str):
            kwargs["global_pool"] = model.global_pool
        return Recipe(architecture, {**kwargs, **(model_kwargs or {})})

    def rebuild(self, recipe: Recipe, where: str) -> nn.Module:
        try:
            return timm.create_model(recipe.architecture, pretrained=False, **recipe.model_kwargs)
        except Exception as exc:  # timm raises RuntimeError (unknown name), TypeError/ValueError (arguments)
            raise CheckpointError(
                f"{where}: 'architecture' {recipe.architecture!r} with 'model_kwargs' {recipe.model_kwargs} cannot "
                f"be built by timm.create_model ({type(exc).__name__}: {exc})"
            ) from exc

    def install_guards(self, model: nn.Module, first: int, dense: bool = False) -> None:
        patches = self.num_tokens(model) - self.num_prefix_tokens(model)
        install_guards(model, first, (self.channels(model), patches) if dense else None)

    def confine_state(self, model: nn.Module) -> None:
        confine_state(model, self.channels(model), self.num_tokens(model))
